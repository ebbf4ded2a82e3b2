"""Command-line interface: parse and check arguments, call library functions, print results.

Each subcommand has an `_add_<name>(subparsers)` that declares its arguments and sets `func`.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading

from trajformer.config import EnsembleConfig

DESCRIPTION = """\
The Trajectory Transformer (Janner, Li & Levine 2021) on Gymnasium v5 and Minari: train a GPT on discretized
trajectories, plan with a KV-cached beam search, and predict long horizons.

start with:  trajformer quickstart           (offline: dataset -> train -> plan, a few minutes)
then:        trajformer train configs/hopper-medium-local.toml
             trajformer plan runs/hopper-medium-local --episodes 5 --num-envs 5
help on one command:  trajformer COMMAND --help"""


class _Help(argparse.RawDescriptionHelpFormatter):
    """Defaults shown after each option's help (where there is one); descriptions and examples as written."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        shown = not (action.default is None or action.default is False or action.default == []
                     or action.default == argparse.SUPPRESS)  # a default of 0 is shown (0 == False, not `is`)
        if shown and "%(default)" not in text and action.option_strings:
            text += " (default: %(default)s)"
        return text


def _parser(sub, name: str, summary: str, example: str) -> argparse.ArgumentParser:
    """A subcommand with a one-line summary, an example, and defaults in its help."""
    return sub.add_parser(name, help=summary, description=summary, epilog=f"example:\n  {example}",
                          formatter_class=_Help)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `trajformer` command."""
    from trajformer import __version__

    parser = argparse.ArgumentParser(prog="trajformer", description=DESCRIPTION, formatter_class=_Help)
    parser.add_argument("--version", action="version", version=f"trajformer {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in _COMMANDS:
        add(sub)
    args = parser.parse_args(argv)
    # `kill` and a scheduler's time limit send SIGTERM: stop as Ctrl-C does (train checkpoints, eval keeps its
    # episodes). A SIGINT that the shell set to ignored (a job started with `&` from a script) stays ignored.
    handled = threading.current_thread() is threading.main_thread() and \
        signal.getsignal(signal.SIGTERM) != signal.SIG_IGN
    previous = signal.signal(signal.SIGTERM, _terminate) if handled else None
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        # Library errors are one-line messages that name the problem and the fix.
        print(f"trajformer {args.command}: error: {err}", file=sys.stderr)
        sys.exit(2)
    except BrokenPipeError:  # the reader went away (`trajformer info RUN | head`): stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at interpreter exit
        sys.exit(1)
    except OSError as err:  # the machine's side: a full disk, permissions (the message names the file), or an
        # evaluation worker killed from outside (ChildProcessError: the OOM killer; it says how to go on)
        print(f"trajformer {args.command}: error: {err}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt as err:  # Ctrl-C: one line saying where it stopped and how to go on, no traceback
        # Commands that can go on say how (train, eval); the others may have written some of their files.
        print(f"\ntrajformer {args.command}: {str(err) or 'interrupted'}", file=sys.stderr)
        sys.exit(130)
    finally:
        if handled:
            signal.signal(signal.SIGTERM, previous)


def _terminate(signum: int, frame) -> None:
    """SIGTERM handler: the KeyboardInterrupt every command already stops on in order."""
    raise KeyboardInterrupt


def _json_object(text: str) -> dict:
    """--env-kwargs parsed as JSON, or argparse's one-line usage error with an example (collect checks it is an
    object)."""
    import json

    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"{text!r} is not JSON ({err}); write e.g. '{{\"ctrl_cost_weight\": 0.1}}'") \
            from None
    return value


def _number(x: float | None) -> str:
    """A return for the terminal: one decimal, or '-' where there is none (a dataset without complete episodes)."""
    return "-" if x is None else f"{x:.1f}"


def _add_overrides(p, example: str = "train.max_steps=200", metavar: str = "SECTION.KEY=VALUE") -> None:
    """The repeatable --set option every config-reading command takes."""
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar=metavar,
                   help=f"override a config key, e.g. --set {example} (repeatable)")


def _add_train(sub) -> None:
    p = _parser(sub, "train", "train a Trajectory Transformer on a Minari dataset into a run directory",
                "trajformer train configs/hopper-medium-local.toml --set train.max_windows=250000")
    p.add_argument("config", nargs="?", help="TOML config (see configs/); with --resume, the run's own by default")
    p.add_argument("--dataset", default=None, help="Minari dataset id (overrides data.dataset)")
    p.add_argument("--out", default=None, help="run directory (default runs/<config name>)")
    _add_overrides(p)
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last checkpoint (bit-identical to an uninterrupted run)")
    p.set_defaults(func=_cmd_train)


def _cmd_train(args) -> None:
    from pathlib import Path

    from trajformer.config import load_config
    from trajformer.train import train

    if args.config is None:
        if not (args.resume and args.out):
            raise ValueError("give a CONFIG to train (e.g. configs/quickstart.toml), or --resume --out RUN_DIR")
        args.config = Path(args.out) / "config.toml"
        if not args.config.is_file():
            raise FileNotFoundError(f"{args.out} has no config.toml: it is not a run directory; check --out")
    cfg = load_config(args.config, args.overrides)
    out = Path(args.out) if args.out else Path("runs") / Path(args.config).stem
    run_dir = train(cfg, out, dataset_id=args.dataset, resume=args.resume)
    print(f"run directory: {run_dir}")


def _add_quickstart(sub) -> None:
    p = _parser(sub, "quickstart", "offline end-to-end demo: make a dataset, train, plan (a few minutes)",
                "trajformer quickstart --out runs/quickstart")
    p.add_argument("--out", default="runs/quickstart", help="output directory")
    p.add_argument("--steps", type=int, default=20_000, help="dataset size in transitions (made once)")
    p.add_argument("--plan-steps", type=int, default=100, help="length of the planned episode")
    _add_overrides(p)
    p.set_defaults(func=_cmd_quickstart)


def _cmd_quickstart(args) -> None:
    from trajformer.quickstart import quickstart

    quickstart(args.out, args.steps, args.plan_steps, args.overrides)


def _add_info(sub) -> None:
    p = _parser(sub, "info", "describe a run directory, a shipped model or a Minari dataset",
                "trajformer info pretrained/models/hopper-medium")
    p.add_argument("target", help="RUN_DIR or DATASET_ID")
    p.add_argument("--config", default=None, help="for a dataset: config whose [data]/[discretizer] to apply")
    _add_overrides(p)
    p.set_defaults(func=_cmd_info)


def _cmd_info(args) -> None:
    from trajformer.info import describe

    print(describe(args.target, args.config, args.overrides))


def _add_collect(sub) -> None:
    p = _parser(sub, "collect", "make a local Minari dataset by rolling out a behaviour policy (or a preset)",
                "trajformer collect --preset hopper-medium --steps 100000")
    p.add_argument("env_id", nargs="?", help="Gymnasium env id, e.g. Hopper-v5 (not with --preset)")
    p.add_argument("--preset", help="named dataset trajformer/NAME-v0, e.g. hopper-medium, halfcheetah-replay")
    p.add_argument("--policy", help="'random' (default), a shipped name (hopper-sac-0175k) or a .pt path")
    p.add_argument("--steps", type=int, help="transitions to collect")
    p.add_argument("--dataset-id", help="NAMESPACE/NAME-v0 of the dataset to write")
    p.add_argument("--seed", type=int, default=0, help="seed of the envs' resets and the policy's action noise")
    p.add_argument("--action-noise", type=float, help="Gaussian action noise std, in half action ranges")
    p.add_argument("--deterministic", action="store_true", help="the policy's mean action instead of a sample")
    p.add_argument("--env-kwargs", type=_json_object,
                   help='JSON kwargs for gym.make, e.g. \'{"ctrl_cost_weight": 0.1}\'')
    p.add_argument("--max-episode-steps", type=int, help="time limit (default: the env's own)")
    p.add_argument("--num-envs", type=int, default=16, help="vectorised envs stepping together (part of the data: "
                   "a preset with another count is another dataset; runs record its sha256)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing dataset (kept until the new one is written whole)")
    p.set_defaults(func=_cmd_collect)


def _cmd_collect(args) -> None:
    from minari.storage import get_dataset_path

    from trajformer.collect import collect, collect_preset

    if args.preset is not None:
        extra = [flag for flag in ("env_id", "policy", "dataset_id", "env_kwargs", "action_noise",
                                   "max_episode_steps") if getattr(args, flag) is not None]
        extra += ["deterministic"] if args.deterministic else []
        if extra:
            flags = ", ".join("ENV_ID" if f == "env_id" else "--" + f.replace("_", "-") for f in extra)
            raise ValueError(f"--preset fixes the env, policy, actions and dataset id: drop {flags}")
        dataset = collect_preset(args.preset, args.steps, args.seed, args.overwrite, args.num_envs)
    else:
        if args.env_id is None or args.dataset_id is None:
            raise ValueError("give ENV_ID and --dataset-id NAMESPACE/NAME-v0, or --preset NAME")
        steps = 1_000_000 if args.steps is None else args.steps
        dataset = collect(args.env_id, args.policy or "random", steps, args.dataset_id, args.seed,
                          args.action_noise or 0.0, args.env_kwargs, args.overwrite, args.deterministic,
                          args.max_episode_steps, args.num_envs)
    meta = dataset.storage.metadata
    parts = meta.get("return_mean_per_part", [])  # a combined dataset (medium-expert): each part's
    returns = (f", return {meta['return_mean']:.1f} ± {meta['return_std']:.1f} over complete episodes"
               if meta.get("return_mean") is not None else
               f", return {' / '.join('-' if m is None else f'{m:.1f}' for m in parts)} over the complete episodes "
               "of each part" if any(m is not None for m in parts) else ", no complete episode")
    print(f"{meta['dataset_id']}: {dataset.total_episodes} episodes, {dataset.total_steps} steps{returns} "
          f"in {get_dataset_path(meta['dataset_id'])}")


def _add_plan(sub) -> None:
    p = _parser(sub, "plan", "evaluate a run by beam-search planning (MPC) in its Gymnasium environment",
                "trajformer plan pretrained/models/hopper-medium --episodes 5 --num-envs 5 --set plan.beam_width=32")
    p.add_argument("run_dir", help="run directory written by `trajformer train`")
    p.add_argument("--env", default=None, help="Gymnasium env id (default: the run's, with its kwargs)")
    p.add_argument("--episodes", type=int, default=1, help="episodes to run")
    p.add_argument("--num-envs", type=int, default=1, help="envs planned together in one batched search")
    p.add_argument("--max-steps", type=int, default=None, help="cut episodes after this many steps")
    p.add_argument("--seed", type=int, default=0, help="episode e uses seed + e for the env and the planner")
    _add_overrides(p, "plan.beam_width=32", metavar="plan.KEY=VALUE")
    p.add_argument("--json", dest="json_path", default=None, metavar="OUT.json", help="write the results as JSON")
    p.add_argument("--video", default=None, metavar="OUT.mp4",
                   help="render the first episode (left, real) beside its planned future (right)")
    p.add_argument("--video-speed", type=float, default=1.0,
                   help="playback speed of the video: 1 = the env's real time, 0.25 = four times slower")
    p.set_defaults(func=_cmd_plan)


def _cmd_plan(args) -> None:
    from trajformer.rollout import plan_command

    plan_command(args.run_dir, env_id=args.env, episodes=args.episodes, num_envs=args.num_envs,
                 max_steps=args.max_steps, seed=args.seed, overrides=args.overrides, json_path=args.json_path,
                 video=args.video, video_speed=args.video_speed)


def _add_train_ensemble(sub) -> None:
    p = _parser(sub, "train-ensemble", "train a PETS-style Gaussian dynamics ensemble (the prediction baseline)",
                "trajformer train-ensemble configs/humanoid.toml --members 5 --max-seconds 600")
    p.add_argument("config", help="TOML config whose [data] and split seed (data.split_seed, or train.seed) to use")
    p.add_argument("--dataset", default=None, help="Minari dataset id (overrides data.dataset)")
    p.add_argument("--out", default=None, help="ensemble directory (default runs/<config name>-ensemble)")
    _add_overrides(p, "data.max_episodes=10")
    flags = {"members": "ensemble members", "hidden": "units per hidden layer", "layers": "hidden layers",
             "batch_size": "transitions per gradient step", "learning_rate": "Adam learning rate",
             "max_epochs": "epochs at most",
             "patience": "epochs without the mean validation NLL improving before stopping",
             "max_seconds": "training time limit in seconds (0 = none)", "seed": "bootstrap and init seed"}
    for name, text in flags.items():  # shortcuts for --set ensemble.NAME=VALUE; defaults from config.EnsembleConfig
        default = getattr(EnsembleConfig(), name)
        p.add_argument("--" + name.replace("_", "-"), type=type(default), default=None, help=f"{text} "
                       f"(default {default}; the same as --set ensemble.{name}=...)")
    p.set_defaults(func=_cmd_train_ensemble)


def _cmd_train_ensemble(args) -> None:
    from pathlib import Path

    from trajformer.config import load_config
    from trajformer.ensemble import train_ensemble

    shortcuts = [f"ensemble.{name}={value}" for name, value in vars(args).items()
                 if name in vars(EnsembleConfig()) and value is not None]
    cfg = load_config(args.config, [*args.overrides, *shortcuts])
    out = Path(args.out) if args.out else Path("runs") / f"{Path(args.config).stem}-ensemble"
    print(f"ensemble directory: {train_ensemble(cfg, out, dataset_id=args.dataset)}")


def _add_predict(sub) -> None:
    p = _parser(sub, "predict", "long-horizon predictions from held-out starts, against an ensemble baseline",
                "trajformer predict pretrained/models/humanoid-tt --dataset pretrained/data/humanoid-heldout.npz "
                "--baseline pretrained/models/humanoid-ensemble")
    p.add_argument("run_dir", help="run directory written by `trajformer train`")
    p.add_argument("--dataset", default=None,
                   help="Minari dataset id (the run's validation episodes if it is the run's dataset) or a held-out "
                        ".npz slice (default: the run's dataset)")
    p.add_argument("--horizon", type=int, default=100, help="prediction steps")
    p.add_argument("--starts", type=int, default=8, help="held-out start states")
    p.add_argument("--baseline", default=None, metavar="ENSEMBLE_DIR", help="ensemble from `trajformer train-ensemble`")
    p.add_argument("--samples", type=int, default=32, help="open-loop sampled trajectories per start")
    p.add_argument("--ablation", action="append", default=[], metavar="NAME=RUN_DIR",
                   help="another run on the same data and split, its teacher-forced error on the same starts "
                        "(e.g. markovian=DIR trained with data.sequence_length=2, partial=DIR with half the "
                        "data.obs_dims); repeatable")
    p.add_argument("--seed", type=int, default=0, help="seed of the start states and the sampled rollouts")
    p.add_argument("--out", default=None, help="output directory (default RUN_DIR/predict)")
    p.add_argument("--no-render", action="store_true", help="skip the filmstrip and video")
    p.set_defaults(func=_cmd_predict)


def _cmd_predict(args) -> None:
    from trajformer.predict import predict

    ablations = {}
    for item in args.ablation:
        name, _, path = item.partition("=")
        if not name or not path or name in ablations:
            raise ValueError(f"--ablation {item!r}: use NAME=RUN_DIR, each name once (e.g. markovian=runs/hum-markov)")
        ablations[name] = path
    predict(args.run_dir, dataset=args.dataset, horizon=args.horizon, starts=args.starts, baseline=args.baseline,
            samples=args.samples, out=args.out, seed=args.seed, render=not args.no_render, ablations=ablations)


def _add_eval(sub) -> None:
    p = _parser(sub, "eval", "the evaluation protocol: a run at the official planner setting of its task and at the "
                "cheap one, beside the dataset's mean return and BC; writes RUN_DIR/eval.json",
                "trajformer eval runs/hopper-medium-local --episodes 10 --bc runs/hopper-medium-local-bc")
    p.add_argument("run_dir", help="run directory written by `trajformer train`")
    p.add_argument("--episodes", type=int, default=10, help="episodes, seeds 0..N-1")
    p.add_argument("--num-envs", type=int, default=None, help="envs planned together (default: one per episode); "
                   "finished episodes, and every minute and at a stop the episodes under way, are kept in "
                   "RUN_DIR/eval.partial.json, and running the command again after an interruption goes on where it "
                   "stopped, mid-episode")
    p.add_argument("--settings", default="official,32x5",
                   help="comma-separated: official (the official code's setting for the run's task, DESIGN.md §5) "
                   "and/or 32x5 (beam 32, horizon 5)")
    p.add_argument("--bc", nargs="+", default=(), metavar="BC_DIR", help="`trajformer bc` directories evaluated "
                   "on as many episodes, of distinct training seeds (--hp seed=N); the reference is their mean")
    p.add_argument("--again", action="store_true", help="plan a setting again that eval.json already holds for "
                   "the same weights, episodes and search (kept by default, so --bc can be added afterwards); "
                   "also needed to replace eval.json's evaluations of these weights on another episode count")
    p.add_argument("--workers", type=int, default=1, help="processes that share the episodes, each with its own "
                   "envs, planner and plan.num_threads threads (unset: the cores shared out); on a CPU N "
                   "one-thread workers outrun one N-thread process. Episodes are dealt by steps left, and again "
                   "when a worker runs out while another holds two or more. seconds_per_step is then a worker's")
    _add_overrides(p, "plan.device=cuda", "plan.KEY=VALUE")
    p.set_defaults(func=_cmd_eval)


def _cmd_eval(args) -> None:
    from trajformer.rollout import evaluation_protocol

    out = evaluation_protocol(args.run_dir, args.episodes, tuple(args.settings.split(",")), tuple(args.bc),
                              num_envs=args.num_envs, overrides=args.overrides, again=args.again,
                              workers=args.workers)
    for name, record in out["settings"].items():
        score = record["normalized_score"]
        lengths = record.get("lengths")  # eval.json written before lengths were recorded has none
        print(f"{name}: return {record['mean_return']:.1f} ± {record['stderr'] or 0:.1f}"
              + (f", normalised {score:.1f}" if score is not None else "")
              + f", {record['seconds_per_step']:.3f} s per env step"
              + (f", episode length {min(lengths)}-{max(lengths)}" if lengths else ""))
    bc, seeds = out["bc_mean_return"], out.get("bc") or []
    print(f"dataset mean return {_number(out['dataset_mean_return'])}" + (f", BC {bc:.1f}" if bc is not None else "")
          + (" (mean over training seeds: " + ", ".join(f"{b['mean_return']:.1f}" for b in seeds) + ")"
             if len(seeds) > 1 else ""))


BASELINES = {"bc": "behaviour cloning", "iql": "implicit Q-learning (expectile V, TD Q, AWR policy)"}


def _add_baselines(sub) -> None:
    for name, what in BASELINES.items():
        p = _parser(sub, name, f"{what} on a config's dataset and split, evaluated with the shared protocol",
                    f"trajformer {name} configs/hopper-medium-local.toml --episodes 10 --out runs/hopper-{name}")
        p.add_argument("config", help="TOML config whose [data] and split seed (data.split_seed, or train.seed) to use")
        p.add_argument("--dataset", default=None, help="Minari dataset id (overrides data.dataset)")
        p.add_argument("--out", default=None, help=f"output directory (default runs/<config name>-{name})")
        _add_overrides(p, "data.max_episodes=10")
        p.add_argument("--steps", type=int, default=None, help="gradient steps (default: the algorithm's)")
        p.add_argument("--hp", action="append", default=[], metavar="KEY=VALUE",
                       help=f"an {name} setting, e.g. --hp learning_rate=1e-3 (repeatable; see baselines/{name}.py)")
        p.add_argument("--episodes", type=int, default=10, help="evaluation episodes (seeds SEED..SEED+N-1)")
        p.add_argument("--num-envs", type=int, default=10, help="evaluation envs stepped together")
        p.add_argument("--max-steps", type=int, default=None, help="cut evaluation episodes at this many steps "
                       "(default: the env's limit); the dataset's reference is then its first-N-step mean")
        p.add_argument("--seed", type=int, default=0, help="training seed, and the first evaluation episode's seed")
        p.set_defaults(func=_cmd_baseline, baseline=name)


def _cmd_baseline(args) -> None:
    import dataclasses
    import importlib
    from pathlib import Path

    from trajformer.baselines.policy import prefix_reference
    from trajformer.config import load_config
    from trajformer.files import save_json
    from trajformer.rollout import check_counts, evaluate_agent, report

    module = importlib.import_module(f"trajformer.baselines.{args.baseline}")
    settings_cls = {"bc": "BCConfig", "iql": "IQLConfig"}[args.baseline]
    fields = {f.name: f.type for f in dataclasses.fields(getattr(module, settings_cls))}
    values = {"seed": args.seed, **({"steps": args.steps} if args.steps is not None else {})}
    for item in args.hp:
        key, _, value = item.partition("=")
        if key not in fields or not value:
            raise ValueError(f"--hp {item!r}: use KEY=VALUE with KEY one of {', '.join(fields)}")
        kind = float if fields[key] == "float" else int
        try:
            values[key] = kind(value)
        except ValueError:
            raise ValueError(f"--hp {item!r}: {key} takes {'a number' if kind is float else 'an integer'}, "
                             f"e.g. --hp {key}={kind(1)}") from None
    settings = getattr(module, settings_cls)(**values)
    check_counts(args.episodes, args.num_envs, args.max_steps)
    cfg = load_config(args.config, args.overrides)
    out = Path(args.out) if args.out else Path("runs") / f"{Path(args.config).stem}-{args.baseline}"
    getattr(module, f"train_{args.baseline}")(cfg, out, settings, dataset_id=args.dataset)
    agent, meta = getattr(module, f"load_{args.baseline}")(out)
    meta["evaluation"] = evaluate_agent(agent, meta["env"], args.episodes, args.num_envs, args.seed,
                                        max_steps=args.max_steps, meta=meta)
    if args.max_steps is not None:
        reference = prefix_reference(args.dataset or cfg.data.dataset, cfg.data, args.max_steps)
        meta["evaluation"]["dataset_prefix_return_mean"] = reference
        what = f"over the first {args.max_steps} steps {_number(reference)}"
    else:
        what = f"over complete episodes {_number(meta['dataset_mean_return'])}"
    save_json(out / f"{args.baseline}.json", meta)
    print(report(meta["evaluation"]))
    print(f"dataset mean return {what}; {args.baseline} directory {out}")


MODEL_BASED = {"mopo": "MOPO (reward minus lambda x ensemble uncertainty)",
               "morel": "MOReL (halt with -kappa where the ensemble disagrees)",
               "combo": "COMBO (conservative Q on model rollouts)"}


def _add_model_based(sub) -> None:
    for name, what in MODEL_BASED.items():
        p = _parser(sub, name, f"{what}: SAC inside the ensemble's model env, on a config's dataset and split, "
                    "evaluated with the shared protocol",
                    f"trajformer {name} configs/hopper-medium-local.toml --ensemble runs/hopper-ensemble --episodes 10")
        p.add_argument("config", help="TOML config: [data], the split's seed, [model_based] (the paper's settings)")
        p.add_argument("--dataset", default=None, help="Minari dataset id (overrides data.dataset)")
        p.add_argument("--ensemble", default=None, help="a `trajformer train-ensemble` directory on the same data "
                       "(default: model_based.ensemble, else one is trained with [ensemble] into OUT/ensemble)")
        p.add_argument("--out", default=None, help=f"output directory (default runs/<config name>-{name})")
        _add_overrides(p, "model_based.steps=20000")
        p.add_argument("--episodes", type=int, default=10, help="evaluation episodes (seeds 0..N-1)")
        p.add_argument("--num-envs", type=int, default=10, help="evaluation envs stepped together")
        p.set_defaults(func=_cmd_model_based, method=name)


def _cmd_model_based(args) -> None:
    from pathlib import Path

    from trajformer.baselines.model_based import load_model_based, provide_ensemble, train_model_based
    from trajformer.config import load_config
    from trajformer.data import load_episodes
    from trajformer.files import save_json
    from trajformer.rollout import check_counts, evaluate_agent, report

    cfg = load_config(args.config, args.overrides)
    if args.dataset:
        cfg.data.dataset = args.dataset
    check_counts(args.episodes, args.num_envs)
    out = Path(args.out) if args.out else Path("runs") / f"{Path(args.config).stem}-{args.method}"
    data = load_episodes(cfg.data.dataset, cfg.data)  # bad data is refused before the ensemble trains
    ensemble, _ = provide_ensemble(cfg, data, out / "ensemble", args.ensemble or cfg.model_based.ensemble)
    train_model_based(args.method, cfg, out, ensemble)
    agent, meta = load_model_based(out, args.method)
    meta["evaluation"] = evaluate_agent(agent, meta["env"], args.episodes, args.num_envs, meta=meta)
    save_json(out / f"{args.method}.json", meta)
    print(report(meta["evaluation"]))
    print(f"termination in the model: {meta['termination_rule']}; {args.method} directory {out}")


def _add_compare(sub) -> None:
    p = _parser(sub, "compare", "train TT, BC, IQL, MOPO, MOReL, COMBO and TT with IQL's critic on one dataset and "
                "evaluate them with one protocol: OUT/compare.json, compare.md, compare.png",
                "trajformer compare configs/compare-tiny.toml --out runs/compare-tiny")
    p.add_argument("config", help="TOML config: [data], [model]/[train]/[plan] for TT, [model_based], [compare]")
    p.add_argument("--dataset", default=None, help="Minari dataset id (overrides data.dataset)")
    p.add_argument("--methods", default=None, help="comma-separated subset of tt,bc,iql,mopo,morel,combo,tt-critic "
                   "(default: compare.methods)")
    p.add_argument("--episodes", type=int, default=None,
                   help="evaluation episodes per method (default: compare.episodes)")
    p.add_argument("--out", default=None, help="output directory, new or empty (default runs/<config name>-compare)")
    p.add_argument("--resume", action="store_true", help="continue a stopped comparison in --out: keep its rows, "
                   "reuse its trained TT run, IQL and ensemble")
    _add_overrides(p, "compare.tt_run=runs/hopper-medium")
    p.set_defaults(func=_cmd_compare)


def _cmd_compare(args) -> None:
    from pathlib import Path

    from trajformer.compare import compare, markdown_table
    from trajformer.config import load_config

    overrides = list(args.overrides)
    if args.methods is not None:
        overrides.append("compare.methods=[" + ",".join(f'"{m.strip()}"' for m in args.methods.split(",")) + "]")
    if args.episodes is not None:
        overrides += [f"compare.episodes={args.episodes}"]
    cfg = load_config(args.config, overrides)
    out = Path(args.out) if args.out else Path("runs") / f"{Path(args.config).stem}-compare"
    result = compare(cfg, out, dataset_id=args.dataset, resume=args.resume)
    print(markdown_table(result), end="")
    print(f"comparison in {out}/compare.json, compare.md, compare.png")


_COMMANDS: list = [_add_quickstart, _add_train, _add_info, _add_collect, _add_plan, _add_eval, _add_baselines,
                   _add_model_based, _add_compare, _add_train_ensemble, _add_predict]
