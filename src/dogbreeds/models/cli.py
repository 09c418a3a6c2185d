"""`dogbreeds models`: the model zoo at a glance (size, cost, pretrained tags).

torch and timm are imported inside the handler only: the CLI must start fast.
"""
from __future__ import annotations

import json

DEFAULT_MODELS = (
    "convnext_atto", "convnext_femto", "convnext_pico", "convnext_nano", "convnext_tiny",
    "convnext_small", "convnext_base", "convnext_large", "convnext_xlarge",
    "mobilenetv2_050", "mobilenetv2_100", "mobilenetv2_140",
    "resnet50", "efficientnet_b0", "swin_tiny_patch4_window7_224", "vit_small_patch16_224",
)

# ConvNeXt paper (Liu et al. 2022), Table 1 / 11, ImageNet-1K at 224: params (M), FLOPs (G).
# The paper's "FLOPs" are fvcore counts, i.e. multiply-accumulates, comparable to our GMACs.
PAPER = {
    "convnext_tiny": (28.6, 4.5),
    "convnext_small": (50.2, 8.7),
    "convnext_base": (88.6, 15.4),
    "convnext_large": (197.8, 34.4),
    "convnext_xlarge": (350.2, 60.9),
}


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "models",
        help="list models: parameters, GMACs, pretrained tags",
        description="Parameters (M) and multiply-accumulates (GMACs, batch 1) of each model, "
        "measured on the meta device (no weights are built or downloaded), with timm's pretrained tags.",
    )
    p.add_argument("--names", help="comma-separated timm model names (default: ConvNeXt family, "
                   "MobileNetV2 and a few comparison models)")
    p.add_argument("--input-size", type=int, default=224, help="square input side in pixels (default 224)")
    p.add_argument("--paper", action="store_true",
                   help="show the ConvNeXt paper's params/FLOPs beside the measured values and check them")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run)


def model_rows(names, input_size: int = 224) -> list[dict]:
    import timm

    from .factory import _check_name, _register_roadmap
    from .flops import count_gmacs, count_params_m, meta_model

    _register_roadmap()
    rows = []
    for name in names:
        _check_name(name)
        model = meta_model(name)
        paper = PAPER.get(name)
        params, gmacs = count_params_m(model), count_gmacs(model, input_size)
        rows.append({
            "name": name,
            "params_m": round(params, 2),
            "gmacs": round(gmacs, 3),
            "input_size": input_size,
            "pretrained_tags": [t.partition(".")[2] for t in timm.list_pretrained(f"{name}.*")],
            "paper": None if paper is None else {
                "params_m": paper[0],
                "gmacs": paper[1],
                # The paper rounds to 0.1; FLOPs only compare at the paper's 224 input.
                "matches": round(params, 1) == paper[0] and (input_size != 224 or round(gmacs, 1) == paper[1]),
            },
        })
    return rows


def run(args) -> int:
    names = [n.strip() for n in args.names.split(",") if n.strip()] if args.names else list(DEFAULT_MODELS)
    rows = model_rows(names, args.input_size)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(format_table(rows, args.input_size, args.paper))
    return 0


def format_table(rows: list[dict], input_size: int, paper: bool) -> str:
    header = ["model", "params (M)", f"GMACs@{input_size}"]
    if paper:
        header += ["paper params", "paper GFLOPs", "match"]
    header.append("pretrained tags")
    lines = []
    for row in rows:
        cells = [row["name"], f"{row['params_m']:.1f}", f"{row['gmacs']:.2f}"]
        if paper:
            p = row["paper"]
            cells += ["-", "-", "-"] if p is None else [f"{p['params_m']:.1f}", f"{p['gmacs']:.1f}", "yes" if p["matches"] else "NO"]
        tags = row["pretrained_tags"]
        shown = ", ".join(tags[:3]) + (f" (+{len(tags) - 3})" if len(tags) > 3 else "")
        cells.append(shown or "-")
        lines.append(cells)
    widths = [max(len(str(c)) for c in col) for col in zip(header, *lines)]
    out = ["  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip()]
    out.append("  ".join("-" * w for w in widths))
    out += ["  ".join(c.ljust(w) if i == 0 or i == len(cells) - 1 else c.rjust(w)
                      for i, (c, w) in enumerate(zip(cells, widths))).rstrip() for cells in lines]
    return "\n".join(out)
