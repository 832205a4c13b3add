"""dcdb's version (``dcdb.__version__``), in a module of its own: manifests record it, and a module
inside the package takes it from here rather than from the package root, which imports ``dcdb.engine``
for ``dcdb.connect`` and so sits above every module."""

__version__ = "0.1.0"
