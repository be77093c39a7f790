"""`kvlib` command line: a stable contract that scripts call. Each subcommand is a thin wrapper over a
library function; flags mirror params-file keys one to one."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import kvlib
from kvlib.engine import openai_ft, resources, train
from kvlib.engine.config import InputError, ParamError, from_mapping
from kvlib.pipeline import data_needs, notebooks, plan, rejudge, repro_map, reproduce, verify
from kvlib.tasks import prompt_lengths
from kvlib.tasks import synthetic as generate


def _generate(args: argparse.Namespace) -> int:

    overrides = {
        "task": args.task,
        "template": args.template,
        "num_dicts": args.num_dicts,
        "n_train": args.n_train,
        "n_eval": args.n_eval,
        "max_tokens": args.max_tokens,
        "tokenizer": args.tokenizer,
        "seed": args.seed,
    }
    config = generate.config_from_sources(args.params, {k: v for k, v in overrides.items() if v is not None})
    if args.out is None:
        raise ParamError("out: required (--out DIR)")
    generate.check_out_dir(Path(args.out), overwrite=args.force)  # before any generation
    result = generate.write_dataset(config, Path(args.out), progress=not args.quiet)
    print(generate.format_stats(result))
    return 0


def _train(args: argparse.Namespace) -> int:

    resume = "auto" if args.resume_auto else args.resume
    return train.main_cli(params=args.params, out=args.out, resume=resume, dry_run=args.dry_run)


def _openai_finetune(args: argparse.Namespace) -> int:

    return openai_ft.main_cli(params=args.params, dry_run=args.dry_run)


def _init(args: argparse.Namespace) -> int:

    dest = Path(args.dir)
    written = resources.init_project(dest, force=args.force)
    kept = len(resources.resource_files()) - len(written)
    print(f"{dest}: wrote {len(written)} files (notebooks/, params/ of kvlib {kvlib.__version__})"
          + (f"; kept {kept} existing ones (--force replaces them)" if kept else ""))
    print(f"next: cd {dest} && kvlib data fetch --profile quick && kvlib reproduce --profile quick")
    return 0


def _project_dirs(args: argparse.Namespace) -> None:
    """A clear stop when the working directory is not a project (no params/ and notebooks/): an installed kvlib
    writes them with `kvlib init`."""
    if not Path(args.params_dir).is_dir() and not Path(args.notebooks).is_dir():
        raise ParamError(f"params_dir: no {args.params_dir}/ and {args.notebooks}/ in {Path.cwd()}; run kvlib in the "
                         f"repository, or write the notebooks and profiles of this kvlib here with `kvlib init .`")


def _add_profile_run_args(parser: argparse.ArgumentParser) -> None:
    """The options `kvlib reproduce` and `kvlib verify` share (read back by `_profile_run_args`)."""
    parser.add_argument("--profile", required=True)
    parser.add_argument("--only", action="append", help="notebook name (repeatable), e.g. 01_synthetic_data")
    parser.add_argument("--results", default="results")
    parser.add_argument("--params-dir", default="params")
    parser.add_argument("--notebooks", default="notebooks")


def _profile_run_args(args: argparse.Namespace) -> dict:
    """The options `kvlib reproduce` and `kvlib verify` share, as run_profile / verify_profile arguments."""
    return {"only": args.only, "results_root": Path(args.results), "params_root": Path(args.params_dir),
            "notebooks_dir": Path(args.notebooks), "force": args.force, "lock": not args.concurrent}


def _reproduce(args: argparse.Namespace) -> int:

    _project_dirs(args)
    with reproduce.sigterm_as_interrupt():  # a session ending: the running attempt is timed, as on Ctrl-C
        return reproduce.run_profile(args.profile, **_profile_run_args(args), dry_run=args.dry_run,
                                     model=args.model, sets=args.set or (),
                                     allow_underpowered=args.allow_underpowered)


def _verify(args: argparse.Namespace) -> int:

    _project_dirs(args)
    with reproduce.sigterm_as_interrupt():
        return verify.verify_profile(args.profile, **_profile_run_args(args), update=args.update)


def _map(args: argparse.Namespace) -> int:

    plan.profile_dir(args.profile, Path(args.params_dir))  # an unknown profile: one line naming the known ones
    if args.update:
        changed = repro_map.update_readme_map(args.update, args.profile, args.results, args.params_dir)
        print(f"{args.update}: {args.profile} map {'updated' if changed else 'already up to date'}")
    else:
        print(repro_map.readme_map_section(args.profile, args.results, args.params_dir), end="")
    return 0


def _rejudge(args: argparse.Namespace) -> int:

    plan.profile_dir(args.profile, Path(args.params_dir))
    if args.write:
        path = rejudge.write_record(args.profile, args.results, args.params_dir)
        print(f"{path}: written; `kvlib map --profile {args.profile} --update README.md` shows it in the map, "
              f"index.html and claims.png")
    else:
        print(rejudge.format_record(rejudge.build_record(args.profile, args.results, args.params_dir)), end="")
    return 0


def _prompt_lengths(args: argparse.Namespace) -> int:

    datasets = {}
    if args.profile:
        path = plan.profile_dir(args.profile, Path(args.params_dir)) / f"{notebooks.SYNTHETIC_DATA}.yaml"
        declared = from_mapping(notebooks.SyntheticDataNotebookParams, notebooks.read_params_file(path)).datasets
        unknown = [name for name in args.dataset or () if name not in declared]
        if unknown:
            raise ParamError(f"dataset: {', '.join(unknown)} not in {path}; known: {', '.join(declared)}")
        datasets = {name: cfg for name, cfg in declared.items() if not args.dataset or name in args.dataset}
    elif args.dataset:
        raise ParamError("dataset: names a dataset of a profile; give --profile too")
    for d in args.num_dicts or ():  # candidates: the paper's simple task at d dictionaries, no length budget cut
        datasets[f"{args.task}-{'template' if args.template else 'notemplate'}-{d}dicts"] = from_mapping(generate.GenerationConfig, {
            "task": args.task, "template": args.template, "num_dicts": d, "n_train": args.samples, "n_eval": 0,
            "max_tokens": args.max_tokens, "tokenizer": args.model, "seed": 0})
    rows = prompt_lengths.length_table(datasets, args.model, args.num_documents, args.setting, args.questions,
                                       args.data_dir)
    print(prompt_lengths.format_length_table(rows, args.model))
    return 0


def _data(args: argparse.Namespace) -> int:

    return data_needs.main_cli(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvlib", description=__doc__)
    parser.add_argument("--version", action="version", version=f"kvlib {kvlib.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    ini = sub.add_parser("init", help="write the notebooks and profiles (params/) of this kvlib into a folder, to run "
                                      "`kvlib reproduce` there (an installed kvlib outside the repository)")
    ini.add_argument("dir", nargs="?", default=".", help="the folder (created if missing; default: here)")
    ini.add_argument("--force", action="store_true", help="replace files that exist (default: keep them)")
    ini.set_defaults(func=_init)

    gen = sub.add_parser("generate", help="write a synthetic key-value retrieval dataset (train/eval JSONL)")
    gen.add_argument("--params", type=Path, help="YAML with generation parameters (flags override it)")
    gen.add_argument("--task", choices=["simple", "multisubkey"])
    tmpl = gen.add_mutually_exclusive_group()
    tmpl.add_argument("--template", dest="template", action="store_true", default=None,
                      help="append the answer template to the prompt")
    tmpl.add_argument("--no-template", dest="template", action="store_false")
    gen.add_argument("--num-dicts", type=int)
    gen.add_argument("--n-train", type=int)
    gen.add_argument("--n-eval", type=int)
    gen.add_argument("--max-tokens", type=int)
    gen.add_argument("--tokenizer", help="embedded model name, HF id/path, 'tiktoken:<encoding>' or 'spm:<file>'")
    gen.add_argument("--seed", type=int)
    gen.add_argument("--out", help="output directory (refused when it already holds files, unless --force)")
    gen.add_argument("--force", action="store_true", help="overwrite the dataset in an existing --out directory")
    gen.add_argument("--quiet", action="store_true", help="no progress bar")
    gen.set_defaults(func=_generate)

    tr = sub.add_parser("train", help="finetune an open model on a chat JSONL (answer-only loss, full or LoRA)")
    tr.add_argument("--params", type=Path, required=True, help="YAML with training parameters")
    tr.add_argument("--out", help="output directory (overrides params)")
    resume = tr.add_mutually_exclusive_group()
    resume.add_argument("--resume", action="store_true", help="continue from the last checkpoint in the output dir")
    resume.add_argument("--resume-auto", action="store_true",
                        help="what pipelines do: reuse a finished run, continue this run's checkpoints, and start "
                             "over when the checkpoints belong to another config or training file")
    tr.add_argument("--dry-run", action="store_true",
                    help="validate data, tokenizer lengths, steps and a memory estimate without loading weights")
    tr.set_defaults(func=_train)

    oft = sub.add_parser("openai-finetune", help="finetune an OpenAI model (e.g. gpt-3.5-turbo-1106) via the API")
    oft.add_argument("--params", type=Path, required=True)
    oft.add_argument("--dry-run", action="store_true", help="validate the file and print the cost estimate only")
    oft.set_defaults(func=_openai_finetune)

    rep = sub.add_parser("reproduce", help="run the notebooks of a profile with papermill into results/")
    _add_profile_run_args(rep)
    rep.add_argument("--model", metavar="SPEC",
                     help="run the profile with this base model, finetuned and compared in place of the profile's: a "
                          "Hugging Face hub id, a local checkpoint directory, the embedded model, or "
                          "openai:<model>[@<base_url>] (an OpenAI-compatible endpoint: evaluated, not finetuned); "
                          "results go to <results>/<profile>/<model slug>/")
    rep.add_argument("--set", action="append", metavar="NOTEBOOK.KEY=VALUE",
                     help="set one param (repeatable; VALUE is YAML, KEY may be dotted: "
                          "01_synthetic_data.datasets.simple-template.n_train=8), validated like the params files; "
                          "results go to <results>/<profile>/<model slug>/")
    rep.add_argument("--force", action="store_true", help="re-run notebooks that already finished")
    rep.add_argument("--dry-run", action="store_true",
                     help="validate the profile offline and print what would run, what its models need, each "
                          "notebook's predicted wall time on this machine and each pre-registered primary claim's "
                          "expected interval half-width")
    rep.add_argument("--allow-underpowered", action="store_true",
                     help="run even when a pre-registered primary claim cannot reach its interval width at the "
                          "planned n (by default the run stops before any compute, naming the params to change)")
    rep.add_argument("--concurrent", action="store_true",
                     help="run even while another kvlib reproduce writes the same results folder (by default it "
                          "waits for it: results/<profile>/.kvlib.lock)")
    rep.set_defaults(func=_reproduce)

    ver = sub.add_parser("verify", help="run a profile again into results/.verify/<profile>/ and compare with its "
                                         "committed results (tables, claims, figures)")
    _add_profile_run_args(ver)
    ver.add_argument("--force", action="store_true",
                     help="run again even what an earlier verify regenerated with the same params, code and inputs")
    ver.add_argument("--update", action="store_true",
                     help="then replace the committed results with the regenerated ones (only when the run finished)")
    ver.add_argument("--concurrent", action="store_true", help="do not wait for another run of the scratch folder")
    ver.set_defaults(func=_verify)

    mp = sub.add_parser("map", help="the paper-artifact reproduction map of a profile's results (Markdown)")
    mp.add_argument("--profile", required=True)
    mp.add_argument("--results", default="results")
    mp.add_argument("--params-dir", default="params")
    mp.add_argument("--update", metavar="README", help="rewrite the map between the profile's markers in this file")
    mp.set_defaults(func=_map)

    rj = sub.add_parser("rejudge", help="what a profile's committed results say under the current protocol, without "
                                         "running a model: the protocol changes each notebook predates and its "
                                         "claims re-judged from its committed item files")
    rj.add_argument("--profile", required=True)
    rj.add_argument("--results", default="results")
    rj.add_argument("--params-dir", default="params")
    rj.add_argument("--write", action="store_true",
                    help="write the record to <results>/<profile>/rejudged.json (the reproduction map reads it)")
    rj.set_defaults(func=_rejudge)

    pl = sub.add_parser("prompt-lengths", help="token lengths of the MDQA prompts and of synthetic training prompts as "
                                               "a model reads them (chat template included): what a profile's "
                                               "num_dicts and max_tokens are matched by")
    pl.add_argument("--profile", help="measure the datasets of params/<profile>/01_synthetic_data.yaml")
    pl.add_argument("--dataset", action="append", help="only this dataset of the profile (repeatable)")
    pl.add_argument("--num-dicts", type=int, action="append", help="a candidate number of dictionaries (repeatable)")
    pl.add_argument("--task", choices=["simple", "multisubkey"], default="simple", help="the candidates' task")
    pl.add_argument("--no-template", dest="template", action="store_false", help="candidates without the template")
    pl.add_argument("--samples", type=int, default=100, help="candidate prompts drawn per --num-dicts")
    pl.add_argument("--max-tokens", type=int, default=8192, help="the candidates' length budget (prompt + 100)")
    pl.add_argument("--model", default=generate.GenerationConfig.tokenizer, help="whose chat template and tokens")
    pl.add_argument("--num-documents", type=int, default=20, help="MDQA documents per prompt")
    pl.add_argument("--setting", choices=["retrieved", "random"], default="retrieved",
                    help="MDQA distractors (retrieved: LitM's 20-document file; random: any number of documents)")
    pl.add_argument("--questions", type=int, help="MDQA questions drawn with seed 0 (default: every one)")
    pl.add_argument("--data-dir", help="data directory (default: $KVLIB_DATA_DIR, ../shared/data, data/)")
    pl.add_argument("--params-dir", default="params")
    pl.set_defaults(func=_prompt_lengths)

    dt = sub.add_parser("data", help="the data registry (kvlib/engine/datasets.yaml): status, fetch, README table")
    dsub = dt.add_subparsers(dest="data_command", required=True)
    st = dsub.add_parser("status", help="per dataset: present / missing / subset / checksum mismatch, and the fix")
    st.add_argument("names", nargs="*", help="datasets (default: all)")
    st.add_argument("--data-dir", help="data directory (default: $KVLIB_DATA_DIR, ../shared/data, data/)")
    st.add_argument("--no-verify", action="store_true", help="compare sizes only, no checksums (fast)")
    fe = dsub.add_parser("fetch", help="download what is missing, verify checksums, install atomically")
    fe.add_argument("names", nargs="*", help="datasets (default: every non-optional one)")
    fe.add_argument("--data-dir", help="data directory to fill (created if missing)")
    fe.add_argument("--mirror", help="base URL of a copy of a data directory, instead of the official sources "
                                     "(default: $KVLIB_DATA_MIRROR)")
    fe.add_argument("--profile", help="fetch only what this profile's notebooks need and is missing")
    fe.add_argument("--all", action="store_true", help="with no names: the optional datasets too")
    fe.add_argument("--params-dir", default="params")
    fe.add_argument("--notebooks", default="notebooks")
    fe.add_argument("--quiet", action="store_true", help="no progress bars")
    tb = dsub.add_parser("table", help="the registry as README.md's Markdown table")
    tb.add_argument("--update", metavar="README", help="rewrite the table between the markers in this file")
    dt.set_defaults(func=_data)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand. Bad input (a params value, a malformed or missing file, an output in the way) is
    caught before any compute and reported as one line per problem on stderr, naming the file or field and the
    fix, with exit status 2; never a traceback."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ParamError as exc:
        kind = "" if isinstance(exc, InputError) else "invalid parameter: "
        for line in str(exc).splitlines() or [""]:
            print(f"kvlib {args.command}: {kind}{line}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM under `kvlib reproduce`/`verify` (a session ending)
        print(f"kvlib {args.command}: interrupted; finished work is kept (results, trained checkpoints, cached "
              f"answers): run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
