"""Paired-seed comparisons of distillation variants on any detectron2 datasets.

A comparison is a set of detectron2 training runs in one output folder: the teacher (trained
first, when no weights are given), then every variant (a list of distillation terms; none for
the plain student) with every seed. Seed k of every variant has the same student
initialisation and the same batches in the same order (``SEED``; see
:class:`dkd_det.engine.Trainer`), so the variants' APs are paired by seed.

Each run is one process of ``tools/train_net.py`` on a config file the comparison writes into
the run's folder (``<output>/<variant>_seed<k>/run_config.yaml``), so that a run is exactly what a
user would train by hand, on the CPU or on GPUs through detectron2's launcher. A run that
finished writes ``result.json`` (its final COCO evaluation on the evaluation split, its wall
time); a rerun of the comparison reuses it and resumes an interrupted run from its last
checkpoint (``--resume``). A folder trained with another config is refused, not overwritten.
"""

import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Dict, List, NamedTuple, Optional, Sequence

from detectron2.data import DatasetCatalog, MetadataCatalog

from ..config import distill_cfg, get_dkd_cfg
from ..data import register_coco_format
from ..distill import registered_terms
from ..evaluation import read_metrics, seconds_per_iter
from ..files import model_zoo_config_file, open_whole

__all__ = [
    "SPLITS",
    "METRICS",
    "Run",
    "Comparison",
    "expand_variants",
    "dataset_spec",
    "check_splits",
    "final_metrics",
    "build_report",
    "write_report",
]

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
#: The COCO metrics a comparison reports per run and task, as detectron2's COCOEvaluator
#: names them (percent).
METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
PLAIN = "plain"


def expand_variants(names: Sequence[str]) -> Dict[str, List[str]]:
    """{label: terms} for variant names as users write them: ``plain`` (no term), a
    registered term (``kd``, ``dkd``), terms joined by ``+`` (``dkd+pkd``: both, in that
    order), or ``all`` (plain, every registered term alone, and every other term with DKD).
    Labels are ``plain`` and the upper-case term names joined by ``+``."""
    known = registered_terms()
    out: Dict[str, List[str]] = {}
    for name in names:
        if name.lower() == "all":
            out[PLAIN] = []
            for t in sorted(known, key=lambda t: (t != "KD", t != "DKD", t)):
                out[t] = [t]
            for t in sorted(known):
                if t != "DKD" and known[t].reads.isdisjoint({"student_logits"}):
                    out[f"DKD+{t}"] = ["DKD", t]  # a feature term beside DKD's logit term
            continue
        if name.lower() == PLAIN:
            out[PLAIN] = []
            continue
        terms = [t.strip().upper() for t in name.split("+")]
        unknown = [t for t in terms if t not in known]
        if unknown or not all(terms):
            raise ValueError(
                f"Variant {name!r}: {unknown or 'an empty term'} is not a registered "
                f"distillation term. Variants are 'plain', 'all', or registered terms joined by "
                f"'+' (e.g. dkd+pkd); registered: {sorted(known)}."
            )
        out["+".join(terms)] = terms
    if PLAIN not in out:
        raise ValueError("The variants must include 'plain': every variant is compared with it.")
    return {PLAIN: out.pop(PLAIN), **out}


def dataset_spec(split: str, spec: str):
    """``(name, coco_format_entry or None)`` for a split given as a registered dataset name
    (detectron2's builtin ones, those of the config's ``DATASETS.COCO_FORMAT`` or of a
    ``DKD_DET_PLUGINS`` module) or as ``JSON_FILE:IMAGE_ROOT`` (a COCO-format dataset, then
    registered as ``compare_<split>_<hash of its path>``)."""
    if spec in DatasetCatalog.list():
        return spec, None
    json_file, sep, image_root = spec.rpartition(":")
    if not sep or not json_file.endswith(".json"):
        raise ValueError(
            f"--{split} {spec!r} is neither a registered dataset nor JSON_FILE:IMAGE_ROOT (a "
            f"COCO-format annotation file and its image folder, e.g. data/{split}.json:data/"
            f"{split})."
        )
    checks = [(json_file, os.path.isfile, "file"), (image_root, os.path.isdir, "folder")]
    for path, exists, what in checks:
        if not exists(path):
            raise FileNotFoundError(f"--{split} {spec!r}: no such {what} {path!r}.")
    json_file = os.path.abspath(json_file)
    name = f"compare_{split}_{hashlib.sha256(json_file.encode()).hexdigest()[:8]}"
    return name, [name, json_file, os.path.abspath(image_root)]


def _json_file(name: str) -> Optional[str]:
    path = MetadataCatalog.get(name).get("json_file", None)
    return os.path.realpath(path) if path else None


def check_splits(names: Dict[str, str]) -> None:
    """Refuse a test split that is also the train or the val split (the same dataset name,
    or the same annotation file): numbers on it would not be a test of anything."""
    test = names["test"]
    for split in ("train", "val"):
        other = names.get(split)
        if other is None:
            continue
        test_json = _json_file(test)
        same = other == test or (test_json is not None and test_json == _json_file(other))
        if same:
            raise ValueError(
                f"The test split ({test!r}, {_json_file(test)}) is also the {split} split "
                f"({other!r}): a comparison's numbers must come from images that neither "
                "training nor the choice of settings saw. Give a separate test set."
            )


class Run(NamedTuple):
    """One training run of a comparison: ``variant`` label (``teacher`` for the teacher),
    its ``terms``, ``seed`` and the frozen config it trains (its folder is ``OUTPUT_DIR``)."""

    variant: str
    terms: List[str]
    seed: int
    cfg: object

    @property
    def name(self) -> str:
        return self.variant if self.variant == "teacher" else f"{self.variant}_seed{self.seed}"

    @property
    def output_dir(self) -> str:
        return self.cfg.OUTPUT_DIR


def _scale_schedule(cfg, iters: int) -> None:
    """``SOLVER.MAX_ITER = iters`` with the LR steps and warm-up moved in proportion."""
    if iters <= 0 or iters == cfg.SOLVER.MAX_ITER:
        return
    scale = iters / cfg.SOLVER.MAX_ITER
    cfg.SOLVER.STEPS = tuple(max(1, round(s * scale)) for s in cfg.SOLVER.STEPS)
    cfg.SOLVER.WARMUP_ITERS = min(round(cfg.SOLVER.WARMUP_ITERS * scale), iters)
    cfg.SOLVER.MAX_ITER = iters


class Comparison:
    """The runs of a comparison, trained (or reused) in ``output``.

    Args:
        student_config: the student's config file (a dkd-det or detectron2 yaml); every
            variant is this config with its terms (:func:`dkd_det.config.distill_cfg`).
        variants: {label: terms} (:func:`expand_variants`), ``plain`` included.
        seeds: the paired seeds.
        output: the comparison's folder.
        datasets: {"train", "val", "test": dataset name or JSON_FILE:IMAGE_ROOT}
            (:func:`dataset_spec`); val is optional unless ``eval_split`` is val.
        teacher_config: the teacher's config (a path or a detectron2 model-zoo name).
        teacher_weights: its trained weights; empty: the teacher is trained first on the
            train split with ``teacher_config``'s schedule (seed 0).
        iters: the students' ``SOLVER.MAX_ITER`` (0: the config's), steps scaled alike.
        opts, teacher_opts: KEY VALUE overrides of every student and of the teacher.
        eval_split: ``test`` for the report; ``val`` to choose settings.
        jobs: runs trained at the same time (processes); each gets ``cpu_count // jobs``
            threads on the CPU, or its own ``num_gpus`` GPUs.
        num_gpus: GPUs per run (detectron2's launcher; 0: the config's device, one process).
        train_script: the training entry point (``tools/train_net.py``).
    """

    def __init__(
        self,
        student_config: str,
        variants: Dict[str, List[str]],
        seeds: Sequence[int],
        output: str,
        datasets: Dict[str, str],
        teacher_config: str,
        train_script: str,
        teacher_weights: str = "",
        iters: int = 0,
        opts: Sequence[str] = (),
        teacher_opts: Sequence[str] = (),
        eval_split: str = "test",
        jobs: int = 1,
        num_gpus: int = 0,
    ):
        self.output = os.path.abspath(output)
        self.variants, self.seeds = dict(variants), list(seeds)
        self.train_script, self.jobs, self.num_gpus = train_script, max(1, jobs), num_gpus
        self.eval_split = eval_split
        if eval_split not in datasets:
            raise ValueError(f"--eval-split {eval_split}: no --{eval_split} dataset was given.")
        if len(set(self.seeds)) != len(self.seeds) or not self.seeds:
            raise ValueError(f"Seeds {self.seeds}: give distinct seeds, at least one.")
        base = get_dkd_cfg(student_config, opts)
        register_coco_format(base)  # the config's own datasets may be named
        self.names, self._entries = {}, []
        for split, spec in datasets.items():
            if spec:
                name, entry = dataset_spec(split, spec)
                self.names[split] = name
                self._entries += [entry] if entry else []
        base = self._with_datasets(base)
        check_splits(self.names)
        if os.path.isfile(teacher_config):
            teacher_config = os.path.abspath(teacher_config)
        self.teacher_config, self.teacher_opts = teacher_config, list(teacher_opts)
        self.train_teacher = not teacher_weights
        self.teacher_weights = teacher_weights or os.path.join(
            self.output, "teacher", "model_final.pth"
        )
        _scale_schedule(base, iters)
        self.runs = [
            self._student_run(base, v, terms, s) for s in self.seeds for v, terms in
            self.variants.items()
        ]  # fmt: skip
        self.teacher = self._teacher_run()

    # -- configs

    def _with_datasets(self, cfg):
        cfg.DATASETS.COCO_FORMAT = [list(e) for e in cfg.DATASETS.COCO_FORMAT] + [
            e for e in self._entries if e not in cfg.DATASETS.COCO_FORMAT
        ]
        register_coco_format(cfg)
        cfg.DATASETS.TRAIN = (self.names["train"],)
        cfg.DATASETS.TEST = (self.names[self.eval_split],)
        cfg.TEST.EVAL_PERIOD = 0  # the final evaluation only
        return cfg

    def _student_run(self, base, variant: str, terms: List[str], seed: int) -> Run:
        cfg = distill_cfg(base, terms)
        if terms:
            cfg.MODEL.TEACHER.CONFIG_FILE = self.teacher_config
            cfg.MODEL.TEACHER.WEIGHTS = self.teacher_weights
            cfg.MODEL.TEACHER.OPTS = list(self.teacher_opts)
        cfg.SEED = seed
        cfg.OUTPUT_DIR = os.path.join(self.output, f"{variant}_seed{seed}")
        cfg.freeze()
        return Run(variant, terms, seed, cfg)

    def _teacher_run(self) -> Optional[Run]:
        """The teacher's run: trained here, or only evaluated (given weights); None for a
        LazyConfig (.py) teacher with given weights, which tools/train_net.py cannot
        evaluate (its AP is then not reported)."""
        path = self.teacher_config
        if path.endswith(".py"):
            if self.train_teacher:
                raise ValueError(
                    f"The teacher {path!r} is a LazyConfig file: give its trained weights "
                    "(--teacher-weights); the comparison trains yaml teachers only."
                )
            return None
        if not os.path.isfile(path):
            path = model_zoo_config_file(path)  # a model-zoo name (an error names it)
        cfg = self._with_datasets(get_dkd_cfg(path, self.teacher_opts, key="--teacher-config"))
        cfg.MODEL.DEVICE = self.runs[0].cfg.MODEL.DEVICE
        if not self.train_teacher:
            cfg.MODEL.WEIGHTS = self.teacher_weights
        cfg.SEED = 0
        cfg.OUTPUT_DIR = os.path.join(self.output, "teacher")
        cfg.freeze()
        return Run("teacher", [], 0, cfg)

    # -- running

    @staticmethod
    def _config_text(run: Run) -> str:
        return run.cfg.dump()

    def _state(self, run: Run) -> str:
        """ "done" (result.json of this config), "partial" (this config, not finished),
        "new"; a folder of another config is an error."""
        path = os.path.join(run.output_dir, "run_config.yaml")
        if not os.path.isfile(path):
            return "new"
        with open(path) as f:
            same = f.read() == self._config_text(run)
        if not same:
            raise RuntimeError(
                f"{run.output_dir} holds a run of another config than this comparison's "
                f"{run.name} (compare its run_config.yaml). Use another --output, or delete that "
                "folder to retrain it."
            )
        return "done" if os.path.isfile(os.path.join(run.output_dir, "result.json")) else "partial"

    def _write_config(self, run: Run) -> None:
        """``run_config.yaml`` in the run's folder, whole or not at all: a comparison killed
        while writing it must not leave a file that reads as another config's."""
        os.makedirs(run.output_dir, exist_ok=True)
        with open_whole(os.path.join(run.output_dir, "run_config.yaml")) as f:
            f.write(self._config_text(run))

    def _command(self, run: Run) -> List[str]:
        cmd = [sys.executable, self.train_script, "--config-file"]
        cmd += [os.path.join(run.output_dir, "run_config.yaml"), "--resume"]
        if self.num_gpus:
            # a free port of its own: detectron2's default port is one per user, which
            # concurrent jobs would share
            cmd += ["--num-gpus", str(self.num_gpus), "--dist-url", "auto"]
        if run.variant == "teacher" and not self.train_teacher:
            cmd += ["--eval-only"]
        return cmd

    def _env(self, slot: int, parallel: int = 0) -> Dict[str, str]:
        env = dict(os.environ)
        if self.num_gpus:
            first = slot * self.num_gpus
            env["CUDA_VISIBLE_DEVICES"] = ",".join(
                str(i) for i in range(first, first + self.num_gpus)
            )
        else:
            threads = str(max(1, (os.cpu_count() or 1) // (parallel or self.jobs)))
            env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
        return env

    def _finish(self, run: Run, wall: float) -> dict:
        metrics = final_metrics(run.output_dir)
        if not metrics:
            raise RuntimeError(
                f"{run.name} ended without a COCO evaluation in {run.output_dir}/metrics.json."
            )
        result = {
            "metrics": metrics,
            "wall_seconds": wall,
            "train_s_per_iter": (
                seconds_per_iter(run.output_dir)
                if os.path.isfile(os.path.join(run.output_dir, "metrics.json"))
                else float("nan")  # evaluated only
            ),
            "max_iter": run.cfg.SOLVER.MAX_ITER,
        }
        with open_whole(os.path.join(run.output_dir, "result.json")) as f:
            json.dump(result, f, indent=2)
        return result

    def execute(self, say=print) -> Dict[str, dict]:
        """Train every run not finished yet, ``jobs`` at a time; returns {run name: result} for
        every run. A teacher trained here goes first, and the runs without terms (``plain``)
        train beside it: only the distilled runs wait for it. A failed run stops the launch of
        new ones; the error names it and ends with its log."""
        results, todo = {}, []
        runs = ([self.teacher] if self.train_teacher else []) + self.runs
        for run in runs:
            state = self._state(run)
            if state == "done":
                results[run.name] = load_result(run.output_dir)
            else:
                todo.append((run, state))
        reused = len(runs) - len(todo)
        if not todo:
            say(f"reusing {reused} finished run(s) in {self.output}")
        else:
            say(
                f"training {len(todo)} run(s), {self.jobs} at a time"
                + (f" ({reused} finished ones reused)" if reused else "")
            )
            results.update(self._train(todo, say))
        if not self.train_teacher and self.teacher is not None:
            results["teacher"] = self.evaluate_teacher(say)
        return results

    def _train(self, todo, say) -> Dict[str, dict]:
        # SIGTERM (a scheduler, `kill`) ends the comparison as Ctrl-C does: the finally below
        # stops the training processes, which would otherwise go on as orphans.
        main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, _exit_on_sigterm) if main else None
        try:
            return self._train_all(todo, say)
        finally:
            if main:
                signal.signal(signal.SIGTERM, previous)

    def _train_all(self, todo, say) -> Dict[str, dict]:
        results, running, failed = {}, {}, None
        free = list(range(self.jobs))
        todo, parallel = list(todo), min(self.jobs, len(todo))  # a lone run gets every core
        try:
            while todo or running:
                while free and failed is None:
                    # the first run that can start: a distilled run needs the teacher's weights
                    waiting = todo + list(running.values())
                    teacher_pending = any(r.variant == "teacher" for r, *_ in waiting)
                    ready = [i for i, (r, _) in enumerate(todo)
                             if not (r.terms and teacher_pending)]  # fmt: skip
                    if not ready:
                        break
                    run, state = todo.pop(ready[0])
                    self._write_config(run)
                    log = open(os.path.join(run.output_dir, "train_stdout.txt"), "a")
                    slot = free.pop(0)
                    proc = subprocess.Popen(
                        self._command(run), stdout=log, stderr=subprocess.STDOUT,
                        env=self._env(slot, parallel),
                    )  # fmt: skip
                    running[proc] = (run, slot, log, time.time(), state)
                if failed is not None and not todo and not running:
                    break
                time.sleep(0.5)
                for proc in [p for p in running if p.poll() is not None]:
                    run, slot, log, start, state = running.pop(proc)
                    log.close()
                    free.append(slot)
                    if proc.returncode != 0:
                        failed = failed or (run, proc.returncode)
                        todo = []
                        continue
                    results[run.name] = self._finish(run, time.time() - start)
                    ap = results[run.name]["metrics"].get("bbox", {}).get("AP", float("nan"))
                    say(
                        f"  {run.name}: {ap:.2f} box AP ({results[run.name]['wall_seconds']:.0f}"
                        " s" + (", resumed" if state == "partial" else "") + ")"
                    )
        finally:
            for proc, (run, *_rest) in running.items():  # interrupted: stop the children
                proc.terminate()
            for proc in running:
                proc.wait()
        if failed is not None:
            run, rc = failed
            log = os.path.join(run.output_dir, "train_stdout.txt")
            with open(log) as f:
                tail = "".join(f.readlines()[-25:])
            raise RuntimeError(
                f"Run {run.name} failed (exit status {rc}); its log is {log}. The finished "
                f"runs are kept: rerun the comparison to continue. Last lines:\n{tail}"
            )
        return results

    def evaluate_teacher(self, say=print) -> dict:
        """The given teacher's COCO evaluation on the evaluation split (``teacher/result.json``,
        reused when there), by ``tools/train_net.py --eval-only``."""
        run = self.teacher
        if self._state(run) == "done":
            return load_result(run.output_dir)
        say(f"evaluating the teacher {self.teacher_weights}")
        self._write_config(run)
        start = time.time()
        with open(os.path.join(run.output_dir, "train_stdout.txt"), "a") as log:
            rc = subprocess.call(self._command(run), stdout=log, stderr=subprocess.STDOUT,
                                 env=self._env(0))  # fmt: skip
        if rc != 0:
            raise RuntimeError(
                f"Evaluating the teacher failed (exit status {rc}); its log is "
                f"{run.output_dir}/train_stdout.txt."
            )
        return self._finish(run, time.time() - start)

    def config_hash(self) -> str:
        """A short SHA-256 of every run's config: which comparison a report belongs to."""
        h = hashlib.sha256()
        for run in [self.teacher] * (self.teacher is not None) + self.runs:
            h.update(self._config_text(run).encode())
        return h.hexdigest()[:12]


def _exit_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)


def final_metrics(output_dir: str) -> Dict[str, Dict[str, float]]:
    """{task: {metric: value}} (``bbox``, and ``segm`` for masks; :data:`METRICS`) of the last
    evaluation a detectron2 run logged to ``metrics.json`` (EvalHook's scalars) or, for
    ``--eval-only``, wrote to ``eval_results.json``; {} if none."""
    path = os.path.join(output_dir, "eval_results.json")
    if os.path.isfile(path):
        with open(path) as f:
            return {t: {m: r[m] for m in METRICS if m in r} for t, r in json.load(f).items()}
    if not os.path.isfile(os.path.join(output_dir, "metrics.json")):
        return {}
    records = [r for r in read_metrics(output_dir) if "bbox/AP" in r]
    if not records:
        return {}
    last = records[-1]
    out: Dict[str, Dict[str, float]] = {}
    for key, value in last.items():
        task, _, metric = key.partition("/")
        if metric in METRICS:
            out.setdefault(task, {})[metric] = value
    return out


def load_result(output_dir: str) -> dict:
    with open(os.path.join(output_dir, "result.json")) as f:
        return json.load(f)


def build_report(
    comparison: Comparison, results: Dict[str, dict], reference: str = "DKD", bootstrap: int = 100
) -> dict:
    """The report of a finished comparison: every run's COCO metrics, per task (``bbox``;
    ``segm`` too for masks) the statistics of :func:`dkd_det.evaluation.summarise` (each
    variant against ``plain`` and against ``reference``), the evaluation noise of
    ``reference`` - plain (a bootstrap of ``bootstrap`` resamples of the evaluated images,
    seed ``seeds[0]``; none for 0 or without the reference) and the cost of each variant."""
    from ..evaluation import bootstrap_difference, cost_by_variant, results_file, summarise

    c = comparison
    by = {(r.variant, r.seed): results[r.name]["metrics"] for r in c.runs}
    runs = [
        {
            "variant": r.variant,
            "terms": r.terms,
            "seed": r.seed,
            "output_dir": r.output_dir,
            "evaluator_output": results_file(r.cfg),
            **results[r.name],
        }
        for r in c.runs
    ]
    tasks = [t for t in ("bbox", "segm") if all(t in m for m in by.values())]
    variants = list(c.variants)
    ref = reference if reference in c.variants else None
    noise = None
    if bootstrap > 0 and ref and ref != PLAIN:
        run_of = {(r.variant, r.seed): r for r in c.runs}
        files = [results_file(run_of[v, c.seeds[0]].cfg) for v in (ref, PLAIN)]
        gt_json = MetadataCatalog.get(c.names[c.eval_split]).json_file
        workers = min(8, os.cpu_count() or 1)  # nothing else runs now: every core
        noise = bootstrap_difference(gt_json, *files, bootstrap, workers=workers)
        noise["pair"] = [ref, PLAIN]
    eval_name = c.names[c.eval_split]
    return {
        "split": c.eval_split,
        "dataset": eval_name,
        "num_eval_images": len(DatasetCatalog.get(eval_name)),
        "seeds": c.seeds,
        "variants": c.variants,
        "reference": ref,
        "max_iter": c.runs[0].cfg.SOLVER.MAX_ITER,
        "config_hash": c.config_hash(),
        "teacher": results.get("teacher"),
        "runs": runs,
        "tasks": {t: summarise(by, variants, c.seeds, t, PLAIN, ref) for t in tasks},
        "evaluation_noise": noise,
        "cost": cost_by_variant(runs),
    }


def write_report(report: dict, output: str, title: str = "Paired-seed comparison") -> str:
    """``report.json``, ``report.md``, ``ap_per_seed.png`` (box AP; ``ap_per_seed_segm.png``
    for masks) and ``losses.png`` (seed ``seeds[0]`` of every variant) in ``output``; returns
    the markdown body."""
    from ..evaluation import (
        TASK_NAMES,
        comparison_markdown,
        plot_ap_per_seed,
        plot_losses,
        run_table,
    )

    body = comparison_markdown(report)
    with open(os.path.join(output, "report.json"), "w") as f:
        json.dump(report, f, indent=2, default=lambda x: None)
    teacher = (report.get("teacher") or {}).get("metrics", {})
    pictures = []
    for task, stats in report["tasks"].items():
        png = "ap_per_seed.png" if task == "bbox" else f"ap_per_seed_{task}.png"
        plot_ap_per_seed(
            {v: s["ap"] for v, s in stats["variants"].items()},
            os.path.join(output, png),
            reference=("teacher", teacher[task]["AP"]) if task in teacher else None,
            ylabel=f"COCO {TASK_NAMES.get(task, task)} AP ({report['split']} split)",
        )
        pictures.append(f"![{TASK_NAMES.get(task, task)} AP per seed]({png})")
    first = report["seeds"][0]
    plot_losses(
        {
            f"{r['variant']} seed {first}": r["output_dir"]
            for r in report["runs"]
            if r["seed"] == first
        },
        os.path.join(output, "losses.png"),
    )
    with open(os.path.join(output, "report.md"), "w") as f:
        f.write(f"# {title}\n\n{body}\nEvery run:\n\n" + "\n".join(run_table(report)) + "\n\n")
        f.write(
            "AP values are pycocotools' COCO AP from detectron2's COCOEvaluator; each run's "
            "evaluator output is `<run>/inference/<dataset>/`. Intervals: mean paired "
            "difference -+ t(0.975, n-1) * sd / sqrt(n). Training time: detectron2's median "
            "time per iteration; wall: a run's process, training and evaluation.\n\n"
            + "\n\n".join(pictures)
            + "\n\n![losses, seed "
            + str(first)
            + "](losses.png)\n"
        )
    return body
