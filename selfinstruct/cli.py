"""The `selfinstruct` command: parse flags and TOML into a config model, call the library, map errors to exit 2.

Each subcommand is one registry entry naming its config model and run function. Only the chosen subcommand's
module is imported, so `selfinstruct --help` stays fast and never imports torch or vLLM.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from rich.console import Console
from rich.text import Text

from selfinstruct import __version__
from selfinstruct.config import SHARED_TABLES, Section, check_tables, config_to_toml, load_toml, resolve
from selfinstruct.errors import UserError


@dataclass(frozen=True)
class Command:
    help: str
    target: str  # "module:ConfigModel:run_function"; run_function(cfg) -> int | None


COMMANDS: dict[str, Command] = {
    "generate": Command(
        "Grow an instruction corpus from seed tasks with a teacher LLM (Self-Instruct or Alpaca pipeline).",
        "selfinstruct.generate:GenerateConfig:run_generate",
    ),
    "evolve": Command(
        "Evol-Instruct (WizardLM): rewrite a corpus into harder and new tasks over rounds, eliminating failures.",
        "selfinstruct.evolve:EvolveConfig:run_evolve",
    ),
    "magpie": Command(
        "Synthesize instructions without seeds: an aligned chat model writes the queries itself (Magpie).",
        "selfinstruct.magpie:MagpieConfig:run_magpie",
    ),
    "converse": Command(
        "Grow records into multi-turn conversations: a simulated user asks follow-ups, the teacher answers.",
        "selfinstruct.converse:ConverseConfig:run_converse",
    ),
    "prefs": Command(
        "Preference pairs for DPO: policies answer each prompt, a judge grades them, best vs worse is kept.",
        "selfinstruct.prefs:PrefsConfig:run_prefs",
    ),
    "filter": Command(
        "Clean an existing corpus with the heuristic and exact ROUGE-L novelty filters.",
        "selfinstruct.filters.command:FilterCommandConfig:run_filter",
    ),
    "dedup": Command(
        "Drop exact, near (MinHash) and semantic duplicates; --against an eval set to decontaminate.",
        "selfinstruct.dedup:DedupConfig:run_dedup",
    ),
    "select": Command(
        "Pick the best N records (length, IFD, LLM judge, DEITA scores) with a diversity constraint.",
        "selfinstruct.select:SelectConfig:run_select",
    ),
    "export": Command(
        "Write a run's corpus as Alpaca, chat messages, ShareGPT or Parquet, with a dataset card.",
        "selfinstruct.export:ExportConfig:run_export",
    ),
    "train": Command(
        "Fine-tune a model on a corpus (TRL SFTTrainer) or on preference pairs (--method dpo); full, LoRA, QLoRA.",
        "selfinstruct.train:TrainConfig:run_train",
    ),
    "evaluate": Command(
        "Score a tuned model against its base on held-out tasks (ROUGE-L, exact match, log-loss).",
        "selfinstruct.evaluate:EvaluateConfig:run_evaluate",
    ),
    "split": Command(
        "Split a corpus into train and held-out sets by task category (for evaluating unseen task types).",
        "selfinstruct.split:SplitConfig:run_split",
    ),
    "templatize": Command(
        "Turn a labelled dataset into FLAN-style instruction records with Jinja templates (YAML).",
        "selfinstruct.templatize:TemplatizeConfig:run_templatize",
    ),
    "mix": Command(
        "Mix instruction corpora by weight with per-task caps (FLAN-style task mixtures).",
        "selfinstruct.mix:MixConfig:run_mix",
    ),
    "plan": Command(
        "Estimate a run before it runs: requests, tokens, cost and time per stage (plan generate FLAGS…).",
        "selfinstruct.plan:PlanConfig:run_plan",
    ),
    "merge": Command(
        "Merge the run directories of --shard i/N jobs into one run (dedup, novelty re-check, summed summary).",
        "selfinstruct.merge:MergeConfig:run_merge",
    ),
    "stats": Command(
        "Corpus statistics with plots and a self-contained HTML report.",
        "selfinstruct.report:StatsConfig:run_stats",
    ),
}

err_console = Console(stderr=True, highlight=False, soft_wrap=True)


def _load(name: str):
    """Import a command's config model and run function; a missing module means 'not implemented yet'."""
    module_name, model_name, func_name = COMMANDS[name].target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and module_name.startswith(e.name):
            raise UserError(f"'{name}' is not implemented yet") from None
        raise
    return getattr(module, model_name), getattr(module, func_name)


def _chosen_command(argv: Sequence[str]) -> str | None:
    for arg in argv:
        if not arg.startswith("-"):
            return arg if arg in COMMANDS else None
    return None


def build_parser(chosen: str | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="selfinstruct",
        description="Instruction tuning from seed tasks: generate, filter, export, train, evaluate, report.",
    )
    parser.add_argument("--version", action="version", version=f"selfinstruct {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, cmd in COMMANDS.items():
        p = sub.add_parser(name, help=cmd.help, description=cmd.help)
        if name == chosen:
            from selfinstruct.config import add_arguments

            p.add_argument("--config", metavar="TOML", help="read settings from this TOML file (flags win)")
            p.add_argument(
                "--print-config", action="store_true", help="print the resolved config as TOML and exit"
            )
            add_arguments(p, _load(name)[0])
    return parser


def parse_command(argv: Sequence[str]) -> tuple[str | None, Section | None, bool]:
    """(command, resolved config, --print-config) for a command line; (None, None, False) after printing help.

    `selfinstruct plan` also resolves the command line it plans with this."""
    chosen = _chosen_command(argv)
    parser = build_parser(chosen)
    args = vars(parser.parse_args(argv))
    name = args.pop("command", None)
    if name is None:
        parser.print_help()
        return None, None, False
    model, _ = _load(name)
    toml_path = args.pop("config", None)
    print_config = args.pop("print_config", False)
    toml_data = None
    if toml_path:
        toml_data = load_toml(toml_path)
        check_tables(toml_data, set(COMMANDS) | set(SHARED_TABLES), toml_path)
    return name, resolve(name, model, args, toml_data, toml_path or "config"), print_config


def run(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if _chosen_command(argv) == "plan":  # its own flags, then a whole command line of the command it plans
        from selfinstruct.plan import plan_main

        return plan_main(argv[argv.index("plan") + 1 :])
    name, cfg, print_config = parse_command(argv)
    if name is None or cfg is None:
        return 2
    if print_config:
        print(config_to_toml(name, cfg), end="")
        return 0
    return int(_load(name)[1](cfg) or 0)


def main(argv: Sequence[str] | None = None) -> None:
    try:
        code = run(argv)
    except UserError as e:
        # the message quotes user input ("unknown key 'x' in [generate]"): never read it as rich markup
        err_console.print(Text.assemble(("error:", "bold red"), f" {e}"), highlight=False)
        code = e.exit_code
    except KeyboardInterrupt:
        err_console.print("interrupted", markup=False)
        code = 130
    sys.exit(code)


if __name__ == "__main__":
    main()
