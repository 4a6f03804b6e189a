"""REPORT.md of a pile: the manifest's tables and a plot of document lengths before and after
filtering (length_histogram.png)."""
from __future__ import annotations

import io
import pathlib

REPORT = "REPORT.md"
PLOT = "length_histogram.png"


def length_plot(histogram: dict) -> bytes:
    """PNG bytes: documents per length bucket (log-2 bytes), input vs output of the pipeline."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(6.4, 4.0))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    buckets = sorted({int(b) for stage in histogram.values() for b in stage})
    for stage, label in (("input", "before filtering"), ("output", "after filtering and dedup")):
        counts = [histogram[stage].get(str(b), {"documents": 0})["documents"] for b in buckets]
        ax.step(range(len(buckets)), counts, where="mid", label=label)
    ax.set_xticks(range(len(buckets)), [_size(b) for b in buckets], rotation=45, fontsize=7)
    ax.set(xlabel="document length (bytes, upper bound of bucket)", ylabel="documents",
           title="document lengths")
    ax.legend()
    fig.tight_layout()
    out = io.BytesIO()
    fig.savefig(out, format="png", dpi=100)
    return out.getvalue()


def _size(n: int) -> str:
    return f"{n >> 20}M" if n >= 1 << 20 else f"{n >> 10}K" if n >= 1 << 10 else str(n)


def _table(rows: dict, key: str) -> list[str]:
    lines = [f"| {key} | documents | bytes |", "|---|---|---|"]
    lines += [f"| {name} | {v['documents']:,} | {v['bytes']:,} |" for name, v in sorted(rows.items())]
    return lines


def markdown(m: dict) -> str:
    kept = m["output"]["documents"] / max(m["input"]["documents"], 1)
    lines = [f"# Data pile {m['id']}", "",
             f"Created {m['created']}; tags: {', '.join(m['tags']) or 'none'}. "
             f"{m['output']['documents']:,} of {m['input']['documents']:,} documents kept ({kept:.1%}), "
             f"{m['output']['bytes']:,} of {m['input']['bytes']:,} bytes.", "",
             "## Sources", "", "| source | format | domain | licence | files (sha256) |", "|---|---|---|---|---|"]
    for s in m["sources"]:
        files = "<br>".join(f"{pathlib.Path(f['path']).name} `{f['sha256'][:16]}`" for f in s["files"]) or s["path"]
        lines.append(f"| {s['name']} | {s['format']} | {s['domain']} | {s['licence']} | {files} |")
    lines += ["", "## Removed, by stage", ""] + _table(m["removed"], "stage")
    lines += ["", "## Removed, by source and stage", "", "| source | stage | documents | bytes |", "|---|---|---|---|"]
    lines += [f"| {source} | {stage} | {v['documents']:,} | {v['bytes']:,} |"
              for source, stages in m["removed_by_source"].items() for stage, v in sorted(stages.items())]
    lines += ["", "## PII replaced", "", "| kind | replacements |", "|---|---|"]
    lines += [f"| {k} | {v:,} |" for k, v in sorted(m["pii_replaced"].items())] or ["| none | 0 |"]
    lines += ["", "## Languages (kept documents)", ""] + _table(m["languages"], "language")
    lines += ["", "## Domains (kept documents)", ""] + _table(m["domains"], "domain")
    lines += ["", "## Splits", "", "| split | documents | shards |", "|---|---|---|"]
    lines += [f"| {k} | {v['documents']:,} | {v['shards']} |" for k, v in sorted(m["splits"].items())]
    if m["tokenizer"]:
        t = m["tokenizer"]
        lines += ["", f"Tokenizer: `{t['file']}`, {t['type']}, {t['vocab_size']} pieces, sha256 `{t['sha256']}`."]
    lines += ["", "## Document lengths", "", f"![document lengths]({PLOT})", ""]
    return "\n".join(lines)


def write(path: pathlib.Path, m: dict) -> None:
    (path / PLOT).write_bytes(length_plot(m["length_histogram"]))
    (path / REPORT).write_text(markdown(m))
