"""Policies from configs: a preset's name (``configs/policy/<name>.yaml``), a dict with
``_target_``, or a policy object as it is. The CLI and :class:`dynarch.Session` build them
the same way; nothing here imports torch, so the command line is checked before torch loads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from dynarch.errors import ConfigError, close_matches


def config_dir() -> str:
    """The repository's top-level configs/ in a checkout (an editable install), else the copy
    a regular install ships inside the package (``dynarch/configs``, pyproject.toml). An
    absolute path: Hydra would resolve a relative one as a Python package."""
    package = Path(__file__).resolve().parent
    checkout = package.parent / "configs"
    return str(checkout if (checkout / "config.yaml").is_file() else package / "configs")


CONFIG_DIR = config_dir()


def preset_names() -> list[str]:
    """The policy presets a name can choose (configs/policy/*.yaml)."""
    return sorted(p.stem for p in (Path(CONFIG_DIR) / "policy").glob("*.yaml"))


def preset_config(name: str) -> dict[str, Any]:
    """The config of the policy preset ``name``; an unknown name is one line with the known."""
    path = Path(CONFIG_DIR) / "policy" / f"{name}.yaml"
    if not path.is_file():
        known = preset_names()
        raise ConfigError(
            f"unknown policy preset {name!r}; known: {', '.join(known)}"
            + close_matches(name, known)
        )
    loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(loaded, dict) or "_target_" not in loaded:
        raise ConfigError(f"{path} is not a policy config (no _target_)")
    return loaded


def build_policy(policy: Any) -> tuple[Any, dict[str, Any] | None]:
    """The policy object and the config it was built from (None for an object given as it
    is): a preset name, a config with ``_target_``, or an object with ``decide(state)``."""
    if isinstance(policy, str):
        config = preset_config(policy)
    elif isinstance(policy, (dict, DictConfig)):
        config = OmegaConf.to_container(OmegaConf.create(policy), resolve=True)
        if "_target_" not in config:
            raise ConfigError("policy: a config dict needs a _target_ (the policy's class)")
    else:
        if not callable(getattr(policy, "decide", None)):
            raise ConfigError(f"policy: {type(policy).__name__} has no decide(state) method")
        return policy, None
    return instantiate_policy(OmegaConf.create(config)), config


def instantiate_policy(node: DictConfig) -> Any:
    """Build the policy from its ``_target_``; a bad argument is a user error, in one line."""
    try:
        policy = instantiate(node, _convert_="all")
    except InstantiationException as exc:
        cause = exc.__cause__
        detail = joined_lines(cause) if cause is not None and str(cause).strip() else None
        raise ConfigError(f"policy: {detail or joined_lines(exc)}") from None
    if not callable(getattr(policy, "decide", None)):
        raise ConfigError(f"policy: {type(policy).__name__} has no decide(state) method")
    return policy


def joined_lines(exc: BaseException) -> str:
    """Hydra's "Error loading 'x.Y':" and the line that says why, as one line."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    return f"{lines[0]} {lines[1]}" if lines[0].endswith(":") and len(lines) > 1 else lines[0]
