"""The backend's options, parsed once from the dict given to ``torch.compile``.

``torch.compile(model, backend="diffopt", options={...})`` hands the dict to the
backend as ``options=``. Recognised keys:

``passes``
    ``{pass_name: bool | dict}``. ``False`` turns a pass off, ``True`` turns it
    on with its defaults, a dict turns it on with those pass options. Passes not
    named keep their default: on, except the opt-in ones (``pipeline_heads``).
``inductor``
    ``True`` (default): the rewritten graph is compiled by Inductor. ``False``:
    rewrites only; the graph is lowered to ATen with Inductor's decompositions,
    the post-grad passes run on it, and it runs as it is (for debugging, and to
    measure a rewrite on its own).
``strict``
    ``False`` (default): a pass that raises is logged as a warning and the graph
    compiles without it. ``True``: the error propagates (for tests).
``inductor_config``
    Inductor config patches applied while this backend compiles (the same keys
    ``torch.compile(options=...)`` takes with the inductor backend).
``mode``
    Inductor's mode (``"max-autotune"``, ``"max-autotune-no-cudagraphs"``,
    ``"reduce-overhead"``, ``"default"``): torch refuses ``mode=`` together with
    ``options=``, so diffopt takes it here too.

Unknown keys, unknown pass names and values of the wrong type are errors: a
typo must not silently do nothing.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

_KEYS = ("passes", "inductor", "strict", "inductor_config", "mode")
MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclasses.dataclass(frozen=True)
class Options:
    pass_settings: tuple[tuple[str, bool, tuple[tuple[str, Any], ...]], ...] = ()
    inductor: bool = True
    strict: bool = False
    inductor_config: tuple[tuple[str, Any], ...] = ()
    mode: str | None = None

    @classmethod
    def parse(cls, options: Mapping[str, Any] | None, known_passes: Mapping[str, Any]) -> "Options":
        options = dict(options or {})
        unknown = sorted(set(options) - set(_KEYS))
        if unknown:
            raise ValueError(f"diffopt: unknown option(s) {unknown}; known: {list(_KEYS)}")
        settings = []
        for name, value in dict(options.get("passes") or {}).items():
            if name not in known_passes:
                raise ValueError(f"diffopt: unknown pass {name!r}; known: {sorted(known_passes)}")
            if isinstance(value, bool):
                settings.append((name, value, ()))
            elif isinstance(value, Mapping):
                settings.append((name, True, tuple(sorted(value.items()))))
            else:
                raise TypeError(f"diffopt: passes[{name!r}] must be a bool or a dict, got {type(value).__name__}")
        for key in ("inductor", "strict"):
            if not isinstance(options.get(key, False), bool):
                raise TypeError(f"diffopt: option {key!r} must be True or False, got {options[key]!r}")
        inductor_config = options.get("inductor_config") or {}
        if not isinstance(inductor_config, Mapping):
            raise TypeError(f"diffopt: option 'inductor_config' must be a dict, got {type(inductor_config).__name__}")
        mode = options.get("mode")
        if mode is not None and mode not in MODES:
            raise ValueError(f"diffopt: option 'mode' must be one of {list(MODES)}, got {mode!r}")
        return cls(
            pass_settings=tuple(sorted(settings)),
            inductor=options.get("inductor", True),
            strict=options.get("strict", False),
            inductor_config=tuple(sorted(dict(inductor_config).items())),
            mode=mode,
        )

    def pass_enabled(self, name: str, by_default: bool = True) -> bool:
        for setting_name, enabled, _ in self.pass_settings:
            if setting_name == name:
                return enabled
        return by_default

    def pass_config(self, name: str) -> dict[str, Any]:
        for setting_name, _, config in self.pass_settings:
            if setting_name == name:
                return dict(config)
        return {}
