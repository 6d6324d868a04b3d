"""paramiko as mutualbackup imports it: ``from mutualbackup.remote.paramiko_import import paramiko``."""

from __future__ import annotations

import os
import sys
import types


def _import_paramiko() -> types.ModuleType:
    """paramiko, without two imports of its own that every command connecting would pay for nothing:

    - invoke, which it imports only to run ssh_config's "Match exec" (mutualbackup never reads an ssh_config: it
      pins every host itself): a third of paramiko's import time. ``import invoke`` raises ImportError; paramiko
      copes.
    - ``importlib.metadata`` (email, zipfile, csv, pathlib…: about 12 ms), which its ``__init__`` imports for one
      call, ``metadata.version("paramiko")``, the version it puts in its SSH banner. While paramiko is imported
      that name is a stand-in whose ``version`` reads the number from the ``paramiko-X.Y.Z.dist-info`` directory's
      name; anything else, or no such directory, goes to the real module."""
    if "invoke" not in sys.modules:
        sys.modules["invoke"] = None  # type: ignore[assignment]
    if "importlib.metadata" in sys.modules:
        import paramiko

        return paramiko
    stand_in = types.ModuleType("importlib.metadata")
    stand_in.version = _installed_version  # type: ignore[attr-defined]
    stand_in.__getattr__ = _real_metadata_attribute  # type: ignore[attr-defined]  # anything else: the real module's
    sys.modules["importlib.metadata"] = stand_in
    try:
        import paramiko
    finally:
        if sys.modules.get("importlib.metadata") is stand_in:
            del sys.modules["importlib.metadata"]
    return paramiko


def _real_metadata_attribute(name: str) -> object:
    """What the stand-in lacks (another import of ``importlib.metadata`` while paramiko imports, in another
    thread): the real module's."""
    if getattr(sys.modules.get("importlib.metadata"), "version", None) is _installed_version:
        del sys.modules["importlib.metadata"]
    import importlib.metadata

    return getattr(importlib.metadata, name)


def _installed_version(name: str) -> str:
    """The version of the installed distribution ``name``, from its ``NAME-VERSION.dist-info`` directory on
    ``sys.path``; the real ``importlib.metadata.version`` when there is none."""
    prefix = f"{name.replace('-', '_').lower()}-"
    for directory in sys.path:
        try:
            entries = os.listdir(directory or ".")
        except OSError:
            continue
        for entry in entries:
            if entry.endswith(".dist-info") and entry.lower().startswith(prefix):
                return entry[len(prefix):-len(".dist-info")]
    if getattr(sys.modules.get("importlib.metadata"), "version", None) is _installed_version:
        del sys.modules["importlib.metadata"]  # the stand-in: make way for the real module
    from importlib import metadata

    return metadata.version(name)


paramiko = _import_paramiko()  # what ssh.py and channel.py use
