"""The README.md model card of a merged checkpoint."""
from __future__ import annotations

import json

from .._version import __version__


def model_card(cfg, resolved: dict, config_text: str, copied_files) -> str:
    info = cfg.info
    base = f"[{cfg.base_model}]" if cfg.base_model else "none"
    lines = [
        "---",
        "library_name: transformers",
        "tags:",
        "- merge",
        "- fastmerge",
        f"- {cfg.method}",
        *([f"base_model: {cfg.base_model}"] if cfg.base_model else []),
        "---",
        "",
        "# Merged model",
        "",
        f"This checkpoint was made with [fastmerge](https://github.com/) {__version__}, "
        f"merging with **{cfg.method}** ({info.paper}).",
        "",
        f"- base model: {base}",
        "- models merged:",
        *[f"  - {m.ref}" for m in cfg.models],
        f"- threshold scope: {cfg.scope}",
        f"- defaults: {resolved.get('defaults')}",
    ]
    if "lines" in resolved:
        lc = resolved["lines"]
        lines.append(f"- LiNeS: alpha={lc['alpha']} (written: {lc['alpha_as_written']}), "
                     f"beta={lc['beta']}, outside={lc['outside']}, {lc['num_blocks']} blocks")
    lines += ["", "## Configuration", "", "```yaml", config_text.rstrip(), "```", "",
              "## Resolved parameters", "",
              "Every default filled in (also in the safetensors metadata and in "
              "`model.safetensors.index.json`):", "", "```json",
              json.dumps(resolved.get("parameters"), indent=1)[:20000], "```", ""]
    if copied_files:
        lines += [f"Copied from the base: {', '.join(copied_files)}.", ""]
    return "\n".join(lines)
