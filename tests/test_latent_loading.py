"""Loading a latent generator's module from one file (TorchScript, state dict + factory, a
trusted pickle) and reading what it is, on tiny random-weight modules built in code
(tests/tiny_latent_models.py) and saved to temp files: nothing is downloaded.
"""

from __future__ import annotations

import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from coautogen_fl.generation.base import GeneratorLoadError  # noqa: E402
from coautogen_fl.generation.latent import LatentGenerator, load_latent_module, takes_labels  # noqa: E402

from tiny_latent_models import (  # noqa: E402
    LATENT_DIM,
    NAMES,
    NZ,
    ConditionalG,
    build_conditional,
    build_unconditional,
    make,
    reference_output,
)

ROOT = Path(__file__).resolve().parents[1]
FACTORY = "tests.tiny_latent_models:build_conditional"


@pytest.fixture(autouse=True)
def _repo_root_importable(monkeypatch: pytest.MonkeyPatch) -> None:
    """Factories are named as "tests.tiny_latent_models:...": the repository root must be importable."""
    monkeypatch.syspath_prepend(str(ROOT))


def _script(module: nn.Module) -> nn.Module:
    with warnings.catch_warnings():  # newer torch marks TorchScript deprecated
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.script(module)


def _trace(module: nn.Module, *example: torch.Tensor) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.trace(module, example)


def _save_script(module: nn.Module, path: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        module.save(str(path))
    return path


# --- loading: the three formats ----------------------------------------------------------------


def test_scripted_torchscript_loads_with_its_attributes_and_signature(tmp_path: Path) -> None:
    eager = build_conditional()
    path = _save_script(_script(eager), tmp_path / "g.pt")
    module = load_latent_module(str(path))
    assert isinstance(module, torch.jit.ScriptModule) and not module.training
    gen = make(module)
    assert gen.latent_dim == LATENT_DIM and gen.conditional is True
    z = np.random.default_rng(0).standard_normal((4, LATENT_DIM)).astype(np.float32)
    y = np.array([0, 1, 2, 1], dtype=np.int64)
    np.testing.assert_allclose(reference_output(module, z, y), reference_output(eager, z, y), atol=1e-6)


def test_traced_torchscript_needs_latent_dim(tmp_path: Path) -> None:
    traced = _trace(build_unconditional(), torch.zeros(2, NZ))
    path = _save_script(traced, tmp_path / "g.ts")
    module = load_latent_module(str(path))
    with pytest.raises(GeneratorLoadError, match="generator.latent_dim") as info:
        LatentGenerator(module, NAMES, image_size=8)
    assert "\n" not in str(info.value)
    gen = LatentGenerator(module, NAMES, image_size=8, latent_dim=NZ)
    assert gen.latent_dim == NZ and gen.conditional is False
    assert gen.random(1, 3)[0].image.shape == (8, 8)


def test_state_dict_with_factory_loads_the_saved_weights(tmp_path: Path) -> None:
    trained = build_conditional()
    with torch.no_grad():
        trained.fc.bias.fill_(0.25)  # differs from what the factory builds
    path = tmp_path / "g.pth"
    torch.save(trained.state_dict(), path)
    module = load_latent_module(str(path), factory=FACTORY)
    assert isinstance(module, ConditionalG) or type(module).__name__ == "ConditionalG"
    assert not module.training
    torch.testing.assert_close(module.fc.bias, torch.full_like(module.fc.bias, 0.25))
    z = np.random.default_rng(1).standard_normal((3, LATENT_DIM)).astype(np.float32)
    y = np.array([2, 0, 1], dtype=np.int64)
    np.testing.assert_array_equal(reference_output(module, z, y), reference_output(trained, z, y))


def test_pickled_module_is_refused_without_trust(tmp_path: Path) -> None:
    path = tmp_path / "g.pt"
    torch.save(build_unconditional(), path)
    with pytest.raises(GeneratorLoadError, match="generator.trust_pickle=true") as info:
        load_latent_module(str(path))
    assert "\n" not in str(info.value)


def test_pickled_module_loads_with_trust_and_warns(tmp_path: Path) -> None:
    path = tmp_path / "g.pt"
    original = build_unconditional()
    torch.save(original, path)
    with pytest.warns(UserWarning, match="executes code.*only load files you trust"):
        module = load_latent_module(str(path), trust_pickle=True)
    assert not module.training and module.nz == NZ
    z = np.ones((2, NZ), dtype=np.float32)
    np.testing.assert_array_equal(reference_output(module, z, None), reference_output(original, z, None))


def test_state_dict_does_not_warn_even_when_pickles_are_trusted(tmp_path: Path) -> None:
    path = tmp_path / "g.pt"
    torch.save(build_conditional().state_dict(), path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        load_latent_module(str(path), factory=FACTORY, trust_pickle=True)


def test_legacy_torch_save_format_loads(tmp_path: Path) -> None:
    path = tmp_path / "g.pt"
    torch.save(build_conditional().state_dict(), path, _use_new_zipfile_serialization=False)
    assert load_latent_module(str(path), factory=FACTORY).latent_dim == LATENT_DIM


# --- loading: errors ---------------------------------------------------------------------------


def _load_error(path: Path | str, **kwargs) -> str:
    with pytest.raises(GeneratorLoadError) as info:
        load_latent_module(str(path), **kwargs)
    message = str(info.value)
    assert "\n" not in message, message
    return message


def test_missing_file_names_generator_model(tmp_path: Path) -> None:
    message = _load_error(tmp_path / "nope.pt")
    assert "does not exist" in message and "generator.model" in message
    assert "is a folder" in _load_error(tmp_path)


def test_state_dict_without_factory_names_generator_factory(tmp_path: Path) -> None:
    path = tmp_path / "g.pt"
    torch.save(build_conditional().state_dict(), path)
    assert "set generator.factory" in _load_error(path)


@pytest.mark.parametrize(
    ("factory", "expected"),
    [
        ("tests.tiny_latent_models", "not of the form 'package.module:callable'"),
        ("tests.tiny_latent_models:", "not of the form 'package.module:callable'"),
        ("tests tiny:build", "not of the form 'package.module:callable'"),
        ("no_such_package_xyz.models:build", "cannot import module 'no_such_package_xyz.models'"),
        ("tests.tiny_latent_models:build_nothing", "has no attribute 'build_nothing'"),
        ("tests.tiny_latent_models:NOT_CALLABLE", "is not callable"),
        ("tests.tiny_latent_models:build_broken", "failed when called without arguments.*always fails"),
        ("tests.tiny_latent_models:build_not_a_module", "returned int, not a torch.nn.Module"),
    ],
)
def test_bad_factories_name_generator_factory(tmp_path: Path, factory: str, expected: str) -> None:
    path = tmp_path / "g.pt"
    torch.save(build_conditional().state_dict(), path)
    with pytest.raises(GeneratorLoadError, match=expected) as info:
        load_latent_module(str(path), factory=factory)
    assert "generator.factory" in str(info.value) and "\n" not in str(info.value)


def test_state_dict_keys_not_matching_the_factory_module(tmp_path: Path) -> None:
    path = tmp_path / "g.pt"
    torch.save(build_unconditional().state_dict(), path)
    message = _load_error(path, factory=FACTORY)
    assert "does not match" in message and "missing keys" in message and "unexpected keys" in message
    assert "generator.factory" in message


def test_state_dict_shapes_not_matching_the_factory_module(tmp_path: Path) -> None:
    path = tmp_path / "g.pt"
    torch.save(ConditionalG(latent_dim=4).state_dict(), path)  # same keys, other shapes
    message = _load_error(path, factory=FACTORY)
    assert "does not fit" in message and "size mismatch" in message and "generator.factory" in message


def test_files_of_no_known_format(tmp_path: Path) -> None:
    text = tmp_path / "g.pt"
    text.write_text("not a model")
    assert "neither a TorchScript archive" in _load_error(text)
    archive = tmp_path / "other.zip"
    with zipfile.ZipFile(archive, "w") as handle:
        handle.writestr("readme.txt", "hello")
    assert "neither a TorchScript archive" in _load_error(archive)
    listed = tmp_path / "list.pt"
    torch.save([torch.zeros(2)], listed)
    assert "holds a list" in _load_error(listed, factory=FACTORY)
    checkpoint = tmp_path / "ckpt.pt"
    torch.save({"generator": build_conditional().state_dict(), "epoch": 3}, checkpoint)
    message = _load_error(checkpoint, factory=FACTORY)
    assert "not a state dict" in message and "generator.model" in message


def test_cuda_device_without_cuda_is_a_load_error(tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    path = _save_script(_script(build_conditional()), tmp_path / "g.pt")
    assert "CUDA is not available" in _load_error(path, device="cuda")


# --- signature detection -----------------------------------------------------------------------


class _Z(nn.Module):
    def forward(self, z):
        return z


class _ZY(nn.Module):
    def forward(self, z, y):
        return z


class _ZOptionalY(nn.Module):
    def forward(self, z, y=None):
        return z


class _ZTruncation(nn.Module):
    def forward(self, z, truncation=1.0):
        return z


class _ZLabels(nn.Module):
    def forward(self, z, class_labels=0):
        return z


class _Args(nn.Module):
    def forward(self, *args):
        return args[0]


@pytest.mark.parametrize(
    ("module", "expected"),
    [
        (_Z(), False),
        (_ZY(), True),
        (_ZOptionalY(), True),
        (_ZTruncation(), False),
        (_ZLabels(), True),
        (_Args(), False),
    ],
)
def test_takes_labels_reads_the_forward_signature(module: nn.Module, expected: bool) -> None:
    assert takes_labels(module) is expected


def test_takes_labels_reads_torchscript_schemas() -> None:
    assert takes_labels(_script(build_conditional())) is True
    assert takes_labels(_script(build_unconditional())) is False
    assert (
        takes_labels(_trace(build_conditional(), torch.zeros(2, LATENT_DIM), torch.zeros(2, dtype=torch.long))) is True
    )
