"""`coautogen review RUN_DIR`: a local page where a person accepts, rejects or relabels each final
synthetic image, with label propagation to near neighbours as suggestions.

The page (one grid per class) is keyboard-driven: arrows or j/k move, ``a`` accepts, ``r``
rejects, a digit relabels to that class, ``y`` applies the suggestion shown, ``n`` dismisses it.
Every decision is written at once to ``RUN_DIR/review.json`` (atomically), which
``coautogen export`` honours. After a reject or a relabel the server suggests the same decision
for the image's nearest neighbours in embedder space (the run's own embedder, else pixels) that
still carry the old label; nothing changes for them until the reviewer confirms.

Everything here is public post-processing of the synthetic data: no private data is involved.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np

from coautogen_fl.atomic import write_text_atomic
from coautogen_fl.export import REVIEW_FILE, final_entries, read_decisions

#: Neighbours suggested after a reject or relabel.
SUGGESTIONS = 3


class ReviewState:
    """The run's final images, their embeddings and the decisions so far (thread-safe)."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir).expanduser().resolve()
        # Every image of the final dataset, rejected ones too: the reviewer may change their mind.
        items, self.classes = final_entries(self.run_dir)
        self.items = sorted(items, key=lambda i: (i.label, i.image_id))
        self.by_id = {i.image_id: i for i in self.items}
        self.decisions: dict[str, dict[str, Any]] = read_decisions(self.run_dir)
        self.embeddings = self._embed()
        self.lock = threading.Lock()

    def _embed(self) -> np.ndarray:
        """Embeddings of every image: the run's embedder if it loads here, else pixels."""
        from PIL import Image

        from coautogen_fl.config import load_config
        from coautogen_fl.embedding import build_embedder
        from coautogen_fl.schema import EmbedderConfig

        images = np.stack([np.asarray(Image.open(i.path).convert("L"), dtype=np.float32) / 255.0 for i in self.items])
        try:
            embedder = build_embedder(load_config(self.run_dir / "config.yaml").embedder)
        except Exception:  # noqa: BLE001  (a missing model: neighbours by pixels are still useful)
            embedder = build_embedder(EmbedderConfig(name="pixels"))
        vectors = np.asarray(embedder.embed(images), dtype=np.float64)
        return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)

    def label_of(self, image_id: str) -> int:
        return int(self.decisions.get(image_id, {}).get("label", self.by_id[image_id].label))

    def status_of(self, image_id: str) -> str:
        return str(self.decisions.get(image_id, {}).get("status", "pending"))

    def decide(self, image_id: str, status: str, label: int | None = None) -> list[str]:
        """Record a decision (written at once); returns the neighbours suggested for the same one."""
        if image_id not in self.by_id or status not in ("accept", "reject"):
            raise KeyError(f"unknown image {image_id!r} or status {status!r}")
        with self.lock:
            before = self.label_of(image_id)
            decision: dict[str, Any] = {"status": status}
            if label is not None:
                if not 0 <= label < len(self.classes):
                    raise KeyError(f"label {label} is not a class (0..{len(self.classes) - 1})")
                decision["label"] = int(label)
            self.decisions[image_id] = decision
            self._save()
            if status == "accept" and label in (None, before):
                return []
            return self._neighbours(image_id, before)

    def _neighbours(self, image_id: str, label: int) -> list[str]:
        """The nearest undecided images that still carry ``label``."""
        index = [i.image_id for i in self.items]
        here = index.index(image_id)
        order = np.argsort(-(self.embeddings @ self.embeddings[here]))
        picks = [
            index[j]
            for j in order
            if index[j] != image_id and index[j] not in self.decisions and self.label_of(index[j]) == label
        ]
        return picks[:SUGGESTIONS]

    def _save(self) -> None:
        write_text_atomic(
            self.run_dir / REVIEW_FILE, json.dumps({"version": 1, "decisions": self.decisions}, indent=1) + "\n"
        )

    def page_items(self) -> list[dict[str, Any]]:
        return [
            {"id": i.image_id, "label": self.label_of(i.image_id), "status": self.status_of(i.image_id)}
            for i in self.items
        ]


def make_handler(state: ReviewState) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:  # quiet: the terminal shows the URL only
            pass

        def _send(self, body: bytes, kind: str, code: int = 200) -> None:
            self.send_response(code)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:  # noqa: N802  (http.server's name)
            if self.path == "/":
                self._send(PAGE.encode(), "text/html; charset=utf-8")
            elif self.path == "/items":
                self._send(
                    json.dumps({"classes": state.classes, "items": state.page_items()}).encode(), "application/json"
                )
            elif self.path.startswith("/image/") and self.path[7:] in state.by_id:
                self._send(state.by_id[self.path[7:]].path.read_bytes(), "image/png")
            else:
                self._send(b"not found", "text/plain", 404)

        def do_POST(self) -> None:  # noqa: N802
            try:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                ids = body["ids"] if self.path == "/apply" else [body["id"]]
                label = body.get("label")
                suggested = [state.decide(i, body["status"], None if label is None else int(label)) for i in ids]
            except (KeyError, ValueError, TypeError) as exc:
                self._send(json.dumps({"error": str(exc)}).encode(), "application/json", 400)
                return
            reply = {"suggested": suggested[0] if self.path == "/decision" else [], "items": state.page_items()}
            self._send(json.dumps(reply).encode(), "application/json")

    return Handler


def serve(run_dir: str | Path, port: int = 0, host: str = "127.0.0.1") -> ThreadingHTTPServer:
    """A review server for ``run_dir`` on ``host:port`` (0: a free port), not yet serving."""
    return ThreadingHTTPServer((host, port), make_handler(ReviewState(run_dir)))


PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>coautogen review</title><style>
body{font-family:sans-serif;margin:1em} .card{display:inline-block;margin:4px;padding:4px;border:3px solid #ccc;text-align:center}
.card img{width:64px;height:64px;image-rendering:pixelated} .focus{border-color:#06c} .accept{background:#dfd} .reject{background:#fdd;opacity:.5}
.suggest{outline:3px dashed #f80} #help{color:#555} #suggestion{color:#b50;min-height:1.5em}
</style></head><body><h1>Review the synthetic images</h1>
<p id="help">arrows / j k: move &middot; a: accept &middot; r: reject &middot; 0-9: relabel to that class &middot;
y: apply the suggestion &middot; n: dismiss it. Every decision is saved at once.</p>
<p id="suggestion"></p><div id="grid"></div><script>
let classes=[], items=[], focus=0, pending=null;
async function load(){const r=await (await fetch('/items')).json(); classes=r.classes; items=r.items; draw();}
function draw(){const g=document.getElementById('grid'); g.innerHTML='';
 classes.forEach((name,c)=>{const h=document.createElement('h2'); h.textContent='class '+c+': '+name; g.appendChild(h);
  items.forEach((it,i)=>{ if(it.label!==c) return; const d=document.createElement('div');
   d.className='card '+it.status+(i===focus?' focus':'')+(pending&&pending.ids.includes(it.id)?' suggest':'');
   d.id='card-'+it.id; d.dataset.status=it.status; d.dataset.label=it.label;
   d.innerHTML='<img src="/image/'+it.id+'"><br>'+it.id+'<br>'+it.status; d.onclick=()=>{focus=i; draw();}; g.appendChild(d);});});
 document.getElementById('suggestion').textContent = pending ? ('Also '+(pending.status==='reject'?'reject':'relabel to '+classes[pending.label])+
   ' its '+pending.ids.length+' nearest neighbours ('+pending.ids.join(', ')+')? y / n') : '';}
async function post(path, body){const r=await (await fetch(path,{method:'POST',headers:{'Content-Type':'application/json'},body:JSON.stringify(body)})).json();
 items=r.items; return r;}
async function decide(status,label){const it=items[focus]; const body={id:it.id,status:status}; if(label!==undefined) body.label=label;
 const r=await post('/decision',body); pending = r.suggested.length ? {ids:r.suggested,status:status,label:label} : null; draw();}
document.addEventListener('keydown', async e=>{
 if(e.key==='ArrowRight'||e.key==='j'){focus=Math.min(items.length-1,focus+1); draw();}
 else if(e.key==='ArrowLeft'||e.key==='k'){focus=Math.max(0,focus-1); draw();}
 else if(e.key==='a'){await decide('accept');}
 else if(e.key==='r'){await decide('reject');}
 else if(/^[0-9]$/.test(e.key) && +e.key<classes.length){await decide('accept', +e.key);}
 else if(e.key==='y' && pending){const b={ids:pending.ids,status:pending.status}; if(pending.label!==undefined) b.label=pending.label;
   await post('/apply',b); pending=null; draw();}
 else if(e.key==='n'){pending=null; draw();}
 document.body.dataset.ready='1';});
load().then(()=>{document.body.dataset.loaded='1';});
</script></body></html>
"""  # noqa: E501 (embedded HTML, CSS and JavaScript, served as is: wrapping would change the page)
