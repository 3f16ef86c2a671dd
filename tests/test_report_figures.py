"""Report figures: inconclusive cells marked, no empty expert map, no process-wide matplotlib state."""

from __future__ import annotations

import ast

from conftest import REPO
from matplotlib.patches import Rectangle

from npu_fp.report.compare_plots import layer_figure, verdict_figure, write_figures


def doc(verdicts: dict[tuple[str, str], str]) -> dict:
    names = sorted({n for pair in verdicts for n in pair})
    pairs = [
        {"a": a, "b": b, "verdict": v, "log10_p": -400.0 if v == "related" else -2.0}
        for (a, b), v in verdicts.items()
    ]
    return {
        "models": [{"name": n, "signature": f"/none/{n}.json"} for n in names],
        "pairs": pairs,
        "p_threshold": 1e-6,
    }


def hatched(fig) -> list[tuple[float, float]]:
    ax = fig.axes[0]
    return [p.get_xy() for p in ax.patches if isinstance(p, Rectangle) and p.get_hatch()]


def test_verdicts_mark_inconclusive_cells() -> None:
    fig = verdict_figure(doc({("a", "b"): "inconclusive", ("a", "c"): "related"}))
    # both halves of the symmetric matrix, only for the inconclusive pair (a = 0, b = 1)
    assert sorted(hatched(fig)) == [(-0.5, 0.5), (0.5, -0.5)]
    assert hatched(verdict_figure(doc({("a", "b"): "related"}))) == []


def test_no_expert_map_without_agreeing_units(tmp_path) -> None:
    d = doc({("a", "b"): "independent"})
    rows = [{"block": "expert 0", "group": None, "frac": 0.0, "hist": [0, 0, 0]}]
    d["pairs"][0]["expert_map"] = {"rows": rows, "direction": "a->b", "pool_units": 3}
    figs = write_figures(d, tmp_path)
    assert figs["experts"] == {} and not list(tmp_path.glob("experts_*.png"))
    rows[0]["hist"] = [0, 2, 0]
    d["pairs"][0]["verdict"] = "related"
    assert list(write_figures(d, tmp_path)["experts"]) == ["a|b"]


def test_layer_heatmap_has_integer_ticks_and_units() -> None:
    lm = {"z": [[float(i == j) for j in range(6)] for i in range(5)], "monotone_path": []}
    fig = layer_figure({"a": "x", "b": "y"}, lm)
    ax = fig.axes[0]
    fig.canvas.draw()
    assert all(t == int(t) for t in ax.get_xticks()) and all(t == int(t) for t in ax.get_yticks())
    assert "0-based" in ax.get_xlabel() and "standard deviations" in fig.axes[1].get_ylabel()


def test_no_module_sets_process_wide_matplotlib_state() -> None:
    """No pyplot (its figure registry and backend switch) and no matplotlib.use() in npu_fp."""
    offenders = []
    for path in (REPO / "npu_fp").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or "", *(f"{node.module}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                if node.func.attr == "use" and getattr(node.func.value, "id", "") == "matplotlib":
                    names = ["matplotlib.use()"]
            offenders += [
                f"{path.name}:{node.lineno} {n}" for n in names if "pyplot" in n or "use()" in n
            ]
    assert not offenders, offenders
