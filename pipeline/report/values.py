"""Reading and formatting the values of a run's metrics for the report.

The metrics come from JSON written by any version of the pipeline: every key may be
missing and every value may be of an unexpected type, so each reader here tolerates
that and each formatter answers "n/a" rather than raise.
"""

import json
import math

import numpy as np


def lookup(mapping, *keys, default=None):
    """Nested ``dict.get`` that tolerates missing levels and non-dict values."""
    current = mapping
    for key in keys:
        if not isinstance(current, dict) or key not in current:
            return default
        current = current[key]
    return default if current is None else current


def as_float(value):
    """float, or NaN for None / 'n/a' / anything not a number."""
    try:
        out = float(value)
    except (TypeError, ValueError):
        return math.nan
    return out


def fmt_num(value, digits=3) -> str:
    """A number compactly: integers whole, others to ``digits`` places, 'n/a' if none."""
    value = as_float(value)
    if not math.isfinite(value):
        return "n/a"
    if value != 0 and (abs(value) < 1e-2 or abs(value) >= 1e5):
        return f"{value:.{digits}g}"
    if float(value).is_integer():
        return str(int(value))
    return f"{value:.{digits}f}".rstrip("0").rstrip(".")


def fmt_mm(value) -> str:
    """A coordinate in mm to 0.1 mm ('?' when not a number)."""
    value = as_float(value)
    if not math.isfinite(value):
        return "?"
    value = round(value, 1)
    return str(int(value)) if float(value).is_integer() else f"{value:.1f}"


def fmt_value(value) -> str:
    """Human string for a table cell (numbers compact, lists joined)."""
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return fmt_num(value, 4)
    if isinstance(value, (list, tuple)):
        if all(isinstance(v, (int, float, str, bool, type(None), np.generic)) for v in value):
            shown = ", ".join(fmt_value(v) for v in value[:12])
            return f"[{shown}{', …' if len(value) > 12 else ''}]" + (
                f" ({len(value)} values)" if len(value) > 12 else "")
        return json.dumps(value, default=str)[:400]
    return str(value)


def flatten(obj, prefix="") -> list[tuple[str, object]]:
    """Nested dict → [(dotted key, leaf value)]."""
    rows = []
    if isinstance(obj, dict):
        if not obj and prefix:
            rows.append((prefix, "{}"))
        for key, value in obj.items():
            name = f"{prefix}.{key}" if prefix else str(key)
            if isinstance(value, dict):
                rows.extend(flatten(value, name))
            else:
                rows.append((name, value))
    else:
        rows.append((prefix or "value", obj))
    return rows


_ACRONYMS = {"umn": "UMN", "lmn": "LMN", "plic": "PLIC", "prep": "PREP", "cst": "CST",
             "fa": "FA", "mep": "MEP", "qc": "QC"}


def humanise(text) -> str:
    """'umn_damage_plic_asymmetry' → 'UMN damage PLIC asymmetry'."""
    words = ("" if text is None else str(text)).replace("_", " ").split()
    words = [_ACRONYMS.get(w.lower(), w) for w in words]
    if words and words[0] == words[0].lower():
        words[0] = words[0][:1].upper() + words[0][1:]
    return " ".join(words)


def fmt_pct(value) -> str:
    """A fraction as a whole percentage: 0.953 → '95 %'."""
    value = as_float(value)
    return "n/a" if not math.isfinite(value) else f"{100 * value:.0f} %"


def fmt_p(value) -> str:
    """A p value as written in a paper: 'p = 0.10', 'p = 0.004', 'p < 0.001'."""
    value = as_float(value)
    if not math.isfinite(value):
        return "p not recorded"
    if value < 0.001:
        return "p < 0.001"
    return f"p = {value:.2f}" if value >= 0.01 else f"p = {value:.3f}"


def rate_words(rate) -> str:
    """A probability as a percentage: 0.01 → '1 %', 0.005 → '0.5 %'."""
    rate = as_float(rate)
    return "n/a" if not math.isfinite(rate) else f"{fmt_num(100 * rate)} %"


def peak_words(peak) -> str:
    """'x=-20, y=0, z=8 mm RAS' ('' without three coordinates)."""
    if peak is None or len(peak) < 3:
        return ""
    x, y, z = (fmt_mm(v) for v in peak[:3])
    return f"x={x}, y={y}, z={z} mm RAS"


def detection_method(thresholds) -> str:
    """The rule the run's detection used, from the metrics' ``localization.thresholds``:
    ``"calibrated"`` or ``"fixed-ai"`` (also when no ``method`` is recorded, as in runs
    made before there was a choice)."""
    method = thresholds.get("method") if isinstance(thresholds, dict) else None
    return method or "fixed-ai"


def ignored_end_nodes(thresholds):
    """Nodes at each end that the run's detection left out, from the metrics'
    ``localization.thresholds``: ``end_nodes`` under the fixed-AI rule; None under a rule
    that uses every node (``calibrated``)."""
    if not isinstance(thresholds, dict) or detection_method(thresholds) != "fixed-ai":
        return None
    return thresholds.get("end_nodes")


def qc_notices(metrics) -> list:
    """``qc.notices``: what a reader must know that did not stop the assessment (a
    corrected gradient table, left-out volumes, heavy motion, header problems)."""
    notices = lookup(metrics, "qc", "notices") or []
    return [notices] if isinstance(notices, str) else list(notices)


def scaled(value, scale):
    """``value`` × ``scale`` when it is a number, else ``value`` unchanged."""
    if scale == 1 or isinstance(value, bool) or not math.isfinite(as_float(value)):
        return value
    return as_float(value) * scale
