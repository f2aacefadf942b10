"""Generative functa stages of the functa study in ``nnlab reproduce``.

``functa-generate-<model>`` trains a generator on the train functaset of the ``functa-fit`` stage
(:func:`nnlab.functa.generate.run.generate`, resumable) and reports its FID beside the gaussian
baseline and the reconstruction ceiling; ``functa-faces-generate-<model>`` first fits the
functasets of the main CelebA run, then does the same on faces.
"""
from __future__ import annotations

from typing import Any

from nnlab.report import write_csv
from nnlab.reproduce.common import data_dir_for
from nnlab.reproduce.stages import Stage, StageContext, StageResult

HEADLINE = [
    ("gen_fid_diffusion", "generative: diffusion FID (nnlab LeNet-5 features)", None, 1.0),
    ("gen_fid_conditional_diffusion", "generative: class-conditional diffusion FID (nnlab LeNet-5 features)",
     None, 1.0),
    ("gen_fid_flow", "generative: flow FID (nnlab LeNet-5 features)", None, 1.0),
    ("gen_fid_gaussian", "generative: full-covariance Gaussian FID (nnlab LeNet-5 features)", None, 1.0),
    ("gen_fid_reconstruction", "generative: FID of the test reconstructions (the SIREN's ceiling)", None, 1.0),
    ("gen_class_accuracy", "generative: conditional diffusion, samples labelled as asked (%)", None, 100.0),
    ("gen_flow_test_bpd", "generative: flow bits/dim on the standardised test latents", None, 1.0),
    ("gen_faces_fid_diffusion", "generative: faces, diffusion FID (nnlab rotation-CNN features)", None, 1.0),
    ("gen_faces_fid_gaussian", "generative: faces, Gaussian FID (nnlab rotation-CNN features)", None, 1.0),
]

COLUMNS = ["model", "conditional", "fid", "fid_gaussian", "fid_reconstruction", "precision", "recall",
           "num_samples", "steps", "train_minutes"]


def _generate(ctx: StageContext) -> StageResult:
    from nnlab.functa.functaset import fit_split
    from nnlab.functa.generate.model import GenerateConfig
    from nnlab.functa.generate.run import generate

    c = ctx.config
    run = ctx.results[c["run"]].dir / "run"
    data_dir = data_dir_for(ctx, c["data"])
    if c["fit"]:  # the faces: fit the functasets of the main CelebA run here (resumable by chunk)
        sets = ctx.dir / "functasets"
        for split in ("train", "test"):
            fit_split(run, c["data"], split, sets / f"{split}.safetensors", data_dir=data_dir, chunk_size=1000)
    else:
        sets = ctx.results["functa-fit"].dir / "functasets"
    s = generate(run, sets / "train.safetensors", ctx.dir / "gen", GenerateConfig(**c["options"]),
                 data_dir=data_dir, test_functaset=sets / "test.safetensors", resume=ctx.resume)
    write_csv(ctx.dir / "generate.csv", COLUMNS, [[s.get(k) if not isinstance(s.get(k), float)
                                                  else round(s[k], 4) for k in COLUMNS]])
    return StageResult(metrics=_metrics(c, s), tables=["generate.csv"],
                       figures=[f"gen/{name}" for name in s["figures"]], notes=_notes(c, s))


def _metrics(c: dict[str, Any], s: dict[str, Any]) -> dict[str, Any]:
    prefix = "gen_faces_" if c["fit"] else "gen_"
    model = f"conditional_{s['model']}" if s.get("conditional") else s["model"]
    m = {f"{prefix}fid_{model}": s["fid"], f"{prefix}fid_gaussian": s["fid_gaussian"],
         f"{prefix}fid_reconstruction": s["fid_reconstruction"]}
    if s.get("conditional"):
        m["gen_class_accuracy"] = s["class_accuracy_mean"]
    if "test_bpd" in s:
        m["gen_flow_test_bpd"] = s["test_bpd"]
    return m


def _notes(c: dict[str, Any], s: dict[str, Any]) -> list[str]:
    kind = "class-conditional " if s.get("conditional") else ""
    return [f"Generative ({kind}{s['model']}{', faces' if c['fit'] else ''}): {s['fid_label']} against "
            f"{s['num_reference']} test images with {s['num_samples']} samples "
            f"({s['steps']} training steps, {s['train_minutes']:.1f} min)."]


def generate_stages(settings: dict[str, Any] | None, main: str, faces_main: str | None, data: str) -> list[Stage]:
    """One stage per generator in ``settings`` ({"mnist": [options...], "faces": [options...]})."""
    if not settings:
        return []
    out = []
    for opts in settings.get("mnist", []):
        name = f"functa-generate-{opts.get('model', 'diffusion')}{'-conditional' if opts.get('conditional') else ''}"
        out.append(Stage(name, "functa", f"generative functa: {name[16:]} on the train functaset", _generate,
                         {"run": main, "data": data, "fit": False, "options": opts}, needs=(main, "functa-fit")))
    for opts in settings.get("faces", []) if faces_main else []:
        name = f"functa-faces-generate-{opts.get('model', 'diffusion')}"
        out.append(Stage(name, "functa", f"generative functa on faces: {opts.get('model', 'diffusion')}",
                         _generate, {"run": faces_main, "data": "celeba64", "fit": True, "options": opts},
                         needs=(faces_main,)))
    return out

