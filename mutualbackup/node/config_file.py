"""``node.json`` as a file: where it is, whether root alone can have written it, and its JSON.

Read before anything else is imported when a backup's borg starts on the coordinator's hint
(node/preload.py): json and os only. What the values mean is node/config.py.
"""

from __future__ import annotations

import json
import os
import stat

from mutualbackup.node import CONFIG_FILE, DEFAULT_CONFIG, ENVIRONMENT

FORMAT = 1


class ConfigError(Exception):
    """The node's configuration is missing, unreadable, or not trustworthy."""


def config_directory(explicit: str | None = None) -> str:
    """The configuration directory: ``--config``, else ``$MUTUALBACKUP_NODE_CONFIG``, else /etc/mutualbackup-node."""
    return explicit or os.environ.get(ENVIRONMENT) or DEFAULT_CONFIG


def read_config(directory: str, *, trusted: bool | None = None) -> dict:
    """The JSON object of ``node.json`` in ``directory``, of this format; ConfigError saying what is wrong.

    ``trusted`` (default: when this process is root) also requires the directory and the file to be
    owned by root and writable by nobody else.
    """
    path = os.path.join(directory, CONFIG_FILE)
    if trusted is None:
        trusted = os.geteuid() == 0
    try:
        if trusted:
            for checked in (directory, path):
                _check_root_owned(checked)
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"{path} does not exist: this node has not joined (run `mutualbackup-node join`)") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ConfigError(f"{path} is not a mutualbackup-node configuration (format {FORMAT})")
    return data


def borg_program(data: dict) -> str:
    """The borg a node runs, as its configuration names it."""
    return str(data.get("borg") or "borg")


def _check_root_owned(path: str) -> None:
    info = os.stat(path)
    if info.st_uid != 0 or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise ConfigError(f"{path} must be owned by root and writable by root alone; refusing to trust it")
