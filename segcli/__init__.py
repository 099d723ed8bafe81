"""segcli: batch open-vocabulary semantic segmentation in the style of LSeg.

`import segcli` is cheap: torch and the model code load on first use of `segcli.Segmenter`, so
`segcli --help` and `segcli --version` start in a blink. The package's rooms are drawn in
ARCHITECTURE.md.
"""

import importlib
import importlib.machinery
import sys

from segcli.version import __version__

__all__ = ["Segmenter", "Prediction", "__version__"]

# documented module paths from before the package had rooms: the same module objects under the old
# names (not copies, so patching either name patches the one module)
MOVED_MODULES = {
    "segcli.checkpoint": "segcli.models.checkpoint",
    "segcli.options": "segcli.training.options",
    "segcli.train": "segcli.training.trainer",
    "segcli.evaluate": "segcli.training.evaluate",
    "segcli.export": "segcli.models.export",
}


class _MovedModuleFinder:
    """`import segcli.checkpoint` gives segcli.models.checkpoint itself (a meta path finder)."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname in MOVED_MODULES:
            return importlib.machinery.ModuleSpec(fullname, self)
        return None

    def create_module(self, spec):
        return importlib.import_module(MOVED_MODULES[spec.name])

    def exec_module(self, module):
        pass  # already executed under its own name


if not any(isinstance(f, _MovedModuleFinder) for f in sys.meta_path):
    sys.meta_path.append(_MovedModuleFinder())


def __getattr__(name: str):
    if name in ("Segmenter", "Prediction"):
        from segcli.inference import segmenter

        return getattr(segmenter, name)
    raise AttributeError(f"module 'segcli' has no attribute {name!r}")
