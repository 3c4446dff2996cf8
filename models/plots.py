"""The plots of evaluate.py --compare and study.py's report (matplotlib, drawn to PNG files)."""
import numpy as np

from models.report import base_name, setting_order


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_eta(groups, names, path, title=None):
    """Each metric against the symmetric corruption ratio η (error bars: std over seeds), one
    line per (model, sampler, guidance scale); settings with CEP or IP are left out."""
    plt = _plt()
    sweep = [g for g in groups if g["setting"] == "clean" or (g["setting"].startswith("η ") and g["setting"].endswith("%"))]
    cols = min(4, len(names))
    nrows = -(-len(names) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4 * cols, 3.2 * nrows), squeeze=False)
    lines = sorted({(g["model"], g["sampler"], g["cfg"], g["sample_seed"]) for g in sweep})
    for ax, name in zip(axes.flat, names):
        for line in lines:
            pts = sorted((float(g["setting"].split()[1]) if g["setting"] != "clean" else 0.0, g["mean"][name], g["std"][name])
                         for g in sweep if (g["model"], g["sampler"], g["cfg"], g["sample_seed"]) == line and name in g["mean"])
            if pts:
                ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[0 if not np.isfinite(p[2]) else p[2] for p in pts],
                            marker="o", capsize=3, label=f"{line[0]} {line[1]} cfg {line[2]:g}")
        ax.set_xlabel("corruption η (%)")
        ax.set_title(name)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    if lines:
        axes.flat[0].legend(fontsize=6)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_fid_is(groups, names, path, settings=None):
    """FID against IS over the guidance sweep, one curve per setting (mean over seeds; the
    paper's figures), annotated with the scales."""
    fid = next((n for n in names if base_name(n) == "fid"), None)
    is_ = next((n for n in names if base_name(n) == "is"), None)
    if not (fid and is_):
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    curves = sorted({(g["setting"], g["model"], g["sampler"], g["sample_seed"]) for g in groups if settings is None or g["setting"] in settings},
                    key=lambda c: (setting_order(c[0]), c[1:]))
    for curve in curves:
        pts = sorted((g["cfg"], g["mean"][is_], g["mean"][fid], g["std"][is_], g["std"][fid]) for g in groups
                     if (g["setting"], g["model"], g["sampler"], g["sample_seed"]) == curve and fid in g["mean"] and is_ in g["mean"])
        if len({p[0] for p in pts}) < 2 and settings is not None:
            continue
        ax.errorbar([p[1] for p in pts], [p[2] for p in pts], xerr=[np.nan_to_num(p[3]) for p in pts],
                    yerr=[np.nan_to_num(p[4]) for p in pts], marker="o", capsize=2, label=" ".join(map(str, curve[:3])))
        for cfg, x, y, *_ in pts:
            ax.annotate(f"{cfg:g}", (x, y), fontsize=7)
    ax.set_xlabel(is_ + " (higher is better)")
    ax.set_ylabel(fid + " (lower is better)")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def plot_bars(groups, names, path, settings):
    """One panel per metric: a bar per setting (mean, error bar: std over seeds)."""
    plt = _plt()
    cols = min(4, len(names))
    nrows = -(-len(names) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4 * cols, 3.2 * nrows), squeeze=False)
    chosen = [next(g for g in groups if g["setting"] == s) for s in settings if any(g["setting"] == s for g in groups)]
    for ax, name in zip(axes.flat, names):
        means = [g["mean"].get(name, np.nan) for g in chosen]
        stds = [np.nan_to_num(g["std"].get(name, np.nan)) for g in chosen]
        ax.bar(range(len(chosen)), means, yerr=stds, capsize=3, color=[f"C{i}" for i in range(len(chosen))])
        ax.set_xticks(range(len(chosen)), [g["setting"] for g in chosen], rotation=40, ha="right", fontsize=7)
        ax.set_title(name)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_curve(best, curve, fid, reference, path):
    """The learning curve: left, `fid` at each setting's best scale against the training step (mean ±
    std over seeds); right, each setting's Δ against the reference paired by seed, with its 95 % CI."""
    plt = _plt()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    settings = sorted({g["setting"] for g in best}, key=setting_order)
    for i, s in enumerate(settings):
        pts = sorted((g["step"], g["mean"][fid], np.nan_to_num(g["std"][fid])) for g in best if g["setting"] == s)
        left.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o", capsize=3, color=f"C{i}", label=s)
        pts = sorted((step, c["stats"][fid]) for step, comps in curve.items() for c in comps if c["setting"] == s and c["stats"][fid]["n"])
        if pts:
            x = np.array([p[0] for p in pts], dtype=float) * (1 + 0.01 * (i - len(settings) / 2))  # side by side
            mean = np.array([p[1]["mean"] for p in pts])
            err = np.array([[p[1]["mean"] - p[1]["lo"], p[1]["hi"] - p[1]["mean"]] for p in pts]).T
            right.errorbar(x, mean, yerr=np.nan_to_num(err), marker="o", capsize=3, color=f"C{i}", label=s)
    right.axhline(0, color="k", lw=0.8)
    left.set(xlabel="training step", ylabel=f"{fid} at the best scale", yscale="log")
    right.set(xlabel="training step", ylabel=f"Δ {fid} vs {reference} (95 % CI)")
    left.legend(fontsize=7)
    if right.get_legend_handles_labels()[0]:  # no comparison yet: only the reference has runs
        right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
