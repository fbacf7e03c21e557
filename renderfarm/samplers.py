"""The farm's scheduler names and AUTOMATIC1111's sampler and schedule-type names, both ways.

The farm names a scheduler by one word (``euler_a``, ``dpmpp_2m_karras``); A1111 (since 1.9)
names a *sampler* (``Euler a``, ``DPM++ 2M``) and a *schedule type* (``Automatic``, ``Karras``,
``Uniform``), and before 1.9 it wrote both in one name (``DPM++ 2M Karras``), which clients
still send. This module holds the one table between them:

- :data:`A1111_SAMPLERS` writes infotexts (storage/png.py) and answers ``GET /sdapi/v1/samplers``;
- :func:`from_a1111` reads a sampler (and schedule type) back, for the A1111 API and for the
  native API's ``scheduler`` field, which takes A1111's names too (``"Euler a"``).

A1111's schedule types, as its ``modules/sd_schedulers.py`` defines them: ``Automatic`` is the
sampler's own default (Karras for DPM++ 2M, the model's sigmas for the others); ``Uniform`` is the
model's own sigmas; ``Normal`` spaces timesteps evenly between the model's largest and smallest
sigma, which for these models gives the same sigmas as ``Uniform``, so both are accepted for it.
Any other schedule type (Exponential, SGM Uniform, Align Your Steps, ...) is one the farm does not
have, and is refused naming the ones it does.
"""

from __future__ import annotations

#: Our scheduler -> (A1111 sampler, A1111 schedule type), as the farm's infotexts write them.
A1111_SAMPLERS: dict[str, tuple[str, str]] = {
    "euler": ("Euler", "Automatic"),
    "euler_a": ("Euler a", "Automatic"),
    "ddim": ("DDIM", "Automatic"),
    "dpmpp_2m": ("DPM++ 2M", "Uniform"),
    "dpmpp_2m_karras": ("DPM++ 2M", "Karras"),
    "pndm": ("PLMS", "Automatic"),
    "lms": ("LMS", "Automatic"),
    "unipc": ("UniPC", "Automatic"),
    "heun": ("Heun", "Automatic"),
    "flow_match_euler": ("Euler", "Simple"),  # Flux's, as Forge and ComfyUI write it
}

#: A1111 sampler -> {schedule type (lower case) -> our scheduler}. "automatic" is the default.
_BY_SAMPLER: dict[str, dict[str, str]] = {
    "Euler a": {"automatic": "euler_a", "uniform": "euler_a", "normal": "euler_a"},
    "Euler": {"automatic": "euler", "uniform": "euler", "normal": "euler"},
    "DDIM": {"automatic": "ddim", "uniform": "ddim", "normal": "ddim"},
    "DPM++ 2M": {"automatic": "dpmpp_2m_karras", "karras": "dpmpp_2m_karras",
                 "uniform": "dpmpp_2m", "normal": "dpmpp_2m"},
    "PLMS": {"automatic": "pndm", "uniform": "pndm", "normal": "pndm"},
    "LMS": {"automatic": "lms", "uniform": "lms", "normal": "lms"},
    "UniPC": {"automatic": "unipc", "uniform": "unipc", "normal": "unipc"},
    "Heun": {"automatic": "heun", "uniform": "heun", "normal": "heun"},
}

#: A1111's aliases of each sampler (its ``sd_samplers_*.py`` ``aliases`` lists).
A1111_ALIASES: dict[str, list[str]] = {
    "Euler a": ["k_euler_a", "k_euler_ancestral"],
    "Euler": ["k_euler"],
    "DDIM": ["ddim"],
    "DPM++ 2M": ["k_dpmpp_2m"],
    "PLMS": ["plms"],
    "LMS": ["k_lms"],
    "UniPC": ["unipc"],
    "Heun": ["k_heun"],
}

#: A1111's schedule types: name -> label (``GET /sdapi/v1/schedulers`` lists the farm's).
A1111_SCHEDULE_TYPES: dict[str, str] = {
    "automatic": "Automatic",
    "uniform": "Uniform",
    "karras": "Karras",
    "normal": "Normal",
}
_ALL_SCHEDULE_LABELS = (
    "Automatic", "Uniform", "Karras", "Exponential", "Polyexponential", "SGM Uniform",
    "KL Optimal", "Align Your Steps", "Simple", "Normal", "DDIM", "Beta",
)

_SAMPLER_LOOKUP: dict[str, str] = {}
for _name, _aliases in A1111_ALIASES.items():
    for _key in (_name, *_aliases):
        _SAMPLER_LOOKUP[_key.lower()] = _name


def sampler_names() -> list[str]:
    """A1111's names of the samplers the farm has, in A1111's order."""
    return list(_BY_SAMPLER)


def schedule_types(sampler: str) -> list[str]:
    """The schedule types (labels) the farm has for an A1111 sampler."""
    return [A1111_SCHEDULE_TYPES[s] for s in _BY_SAMPLER[sampler]]


def _split_legacy(name: str) -> tuple[str, str | None]:
    """``"DPM++ 2M Karras"`` -> ``("DPM++ 2M", "Karras")``: A1111 before 1.9 named the
    schedule type at the end of the sampler's name (its ``get_sampler_and_scheduler``)."""
    for label in sorted(_ALL_SCHEDULE_LABELS, key=len, reverse=True):
        if name.lower().endswith(" " + label.lower()):
            return name[: -len(label) - 1].strip(), label
    return name, None


def from_a1111(sampler: str, schedule: str | None = None, family: str | None = None) -> str:
    """Our scheduler for an A1111 sampler name (its display name, an alias or a legacy combined
    name like ``DPM++ 2M Karras``, any case) and schedule type (name or label; None or
    ``Automatic`` is the sampler's default). ``ValueError`` says which names are accepted.

    On a ``flux`` model, ``Euler`` (schedule type Automatic or ``Simple``, as Forge and ComfyUI
    write Flux's) is Flux's flow-matching Euler, its only scheduler; other samplers are refused.
    """
    if family == "flux":
        head, legacy = _split_legacy(sampler.strip())
        chosen = (schedule or legacy or "automatic").strip().lower()
        if _SAMPLER_LOOKUP.get(head.lower()) == "Euler" and chosen in ("automatic", "simple"):
            return "flow_match_euler"
        raise ValueError("is not a sampler a Flux model has (Flux takes 'Euler', schedule type "
                         "'Simple' or 'Automatic': flow-matching Euler)")
    name = sampler.strip()
    base = _SAMPLER_LOOKUP.get(name.lower())
    legacy = None
    if base is None:
        head, legacy = _split_legacy(name)
        base = _SAMPLER_LOOKUP.get(head.lower())
    if base is None:
        raise ValueError(f"is not a sampler the farm has (A1111 names: "
                         f"{', '.join(sampler_names())}; with a schedule type: 'DPM++ 2M Karras')")
    chosen = (schedule or "").strip().lower() or "automatic"
    if chosen == "automatic" and legacy:
        chosen = legacy.lower()  # A1111: the name's schedule type wins over "Automatic"
    elif legacy and chosen != legacy.lower():
        raise ValueError(f"names schedule type {legacy!r} but scheduler is {schedule!r}")
    chosen = chosen.replace(" ", "_")
    table = _BY_SAMPLER[base]
    if chosen not in table:
        raise ValueError(f"{base!r} with schedule type {schedule or legacy!r} is not one the farm "
                         f"has (schedule types for {base}: {', '.join(schedule_types(base))})")
    return table[chosen]
