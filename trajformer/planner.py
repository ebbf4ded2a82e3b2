"""Beam-search model-predictive control with the Trajectory Transformer (DESIGN.md §5).

`BeamSearch` plans for K environments at once: the rows of every env share one forward pass per generated
token, ragged contexts are left-padded in the KV cache, and each env draws from its own torch.Generator,
so a batched search gives the same plans as K separate ones: bit for bit in float32 on a CPU at one and two threads
while the envs' contexts are equally long (model.MIN_ROWS, model.encode_attention: MKL's few-row products and
SDPA's threaded kernel rounded a row by the rows beside it), up to float rounding for an env left-padded beside
longer contexts (its keys sit at other offsets of the softmax and matmul sums). Next-token logits come from a decoder of
trajformer.decoding (cached, or the uncached official reference). `Planner` adds each env's context of past
transitions, its random stream and replanning (MPC).

Choices beyond DESIGN.md: the stop token is removed from the action logits *before* the cdf/top-k filters
(it is never sampled there, and filtering first could leave nothing to sample); reward and value tokens
are the argmax over the N bins; a row whose decoded observation contains stop is terminated: its later
tokens are forced to stop and its reward score is frozen, while its log-likelihood keeps counting those
stop tokens, so the likelihood objective does not favour rows merely for ending early. A window model's search
starts from each env's cache carried over from its previous search with the executed transitions appended
(DESIGN.md §5b), unless plan.carry_context = false: then it encodes the env's last max_context_transitions
transitions afresh, as an absolute model's must (README, "The window model").
"""

from __future__ import annotations

import base64
import copy
import dataclasses
import warnings
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from trajformer.config import PlanConfig, apply_overrides, carries, config_from_dict
from trajformer.decoding import CachedDecoder, CarriedCache, NoiseAhead, ReferenceDecoder, draw_per_env
from trajformer.discretizer import Discretizer
from trajformer.model import GPT, native_bf16, usable_device
from trajformer.run import Run, load_run
from trajformer.tokens import VALUE_PLACEHOLDER, encode_values

NEG_INF = float("-inf")

Critic = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""Q(s, a) in environment reward units for decoded (rows, dS) states and (rows, dA) actions (the `critic`
objective: the TT paper's AntMaze variant, with IQL's critic)."""


def filter_cdf(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Mask the tail whose cumulative probability, summed from the least likely token up, stays below p.

    Equivalently keep the smallest set of most probable tokens holding more than 1 - p of the mass; the
    argmax is always kept and ties are split by index, never widened to a uniform draw.
    """
    probs = logits.softmax(-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True, stable=True)
    above = sorted_probs.cumsum(-1) - sorted_probs  # mass of the more probable tokens
    drop = torch.zeros_like(above, dtype=torch.bool).scatter(-1, order, above > 1.0 - p)
    return logits.masked_fill(drop, NEG_INF)


def filter_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits per row (ties with the k-th kept)."""
    if k >= logits.shape[-1]:
        return logits
    kth = logits.topk(k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, NEG_INF)


def draw_ahead(device: torch.device) -> bool:
    """Whether a search draws its noise ahead in a background thread: on a GPU, where the host would otherwise
    be the bottleneck; on a CPU the draws stay inline (the search's threads use the cores)."""
    return device.type != "cpu"


def _env_rows(n_envs: int, rows: int, local: torch.Tensor) -> torch.Tensor:
    """Global row ids of per-env local ids `local` (n_envs, n) when each env owns `rows` consecutive rows."""
    return (local + rows * torch.arange(n_envs, device=local.device)[:, None]).flatten()


@dataclass
class Plan:
    """The best row of one env's search. NaN marks steps after the row terminated (stop) or not decoded."""

    actions: np.ndarray  # (H, dA) bin midpoints; actions[0] is executed
    action_tokens: np.ndarray  # (H, dA) token ids, for the context of later steps
    next_observations: np.ndarray  # (H - 1, dS) predicted s_1 .. s_{H-1}
    rewards: np.ndarray  # (H,) expected rewards r_t used in the score
    values: np.ndarray  # (H,) expected values-to-go V_t
    log_likelihood: float  # summed log-probability of the row's generated tokens
    score: float  # the objective's score that ranked it first
    steps: int  # steps before a predicted termination (H if none)


@dataclass
class _Rows:
    """Per-row search state, re-indexed together with the decoder's rows."""

    ret: torch.Tensor  # discounted sum of expected rewards so far
    score: torch.Tensor  # reward score, frozen once the row terminates
    logp: torch.Tensor  # summed log-probability of generated tokens
    alive: torch.Tensor  # False once an observation token is stop
    rewards: torch.Tensor  # (rows, H)
    values: torch.Tensor  # (rows, H)

    def take(self, index: torch.Tensor) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(self, f.name)[index])


class BeamSearch:
    """Batched beam search over K envs' prefixes (DESIGN.md §5); stateless between calls."""

    def __init__(self, model: GPT, discretizer: Discretizer, cfg: PlanConfig, discount: float, cached: bool = True,
                 critic: Critic | None = None):
        gpt = model.config
        self.T, self.N, self.dS, self.dA = gpt.transition_dim, gpt.n_bins, gpt.obs_dim, gpt.act_dim
        if discretizer.dim != self.T or discretizer.n_bins != self.N:
            raise ValueError(
                f"discretizer ({discretizer.dim} dims, {discretizer.n_bins} bins) does not fit the model "
                f"({self.T} dims, {self.N} bins); load both from the same run directory"
            )
        window = cfg.max_context_transitions * self.T - 1
        if gpt.attention == "absolute" and window > gpt.block_size:
            raise ValueError(
                f"plan.max_context_transitions = {cfg.max_context_transitions} needs {window} tokens but the model "
                f"was trained on windows of {gpt.block_size}; set plan.max_context_transitions <= "
                f"{(gpt.block_size + 1) // self.T}"
            )
        self.carry = carries(cfg, gpt.attention)  # raises for carry_context = true with an absolute model
        if cfg.objective == "critic" and critic is None:
            raise ValueError("plan.objective = \"critic\" needs a critic: load one with rollout.load_critic")
        self.model, self.discretizer, self.cfg, self.discount = model, discretizer, cfg, discount
        self.critic = critic
        self.stop_id = gpt.stop_id
        decoder = CachedDecoder if cached else ReferenceDecoder
        self.decoder: ReferenceDecoder = decoder(model, window)
        # Scores in float32 (float64 for a float64 model, as the exactness tests use) whatever the model computes in:
        # a bfloat16 model's logits are cast up before any softmax, sum or ranking.
        dtype = torch.float64 if next(model.parameters()).dtype == torch.float64 else torch.float32
        self.device = next(model.parameters()).device  # the whole search runs there
        self.midpoints = torch.as_tensor(discretizer.midpoints, dtype=dtype, device=self.device)  # (T, N)

    def tokens(self, values: np.ndarray, first_dim: int) -> torch.Tensor:
        """Token ids of values for consecutive dimensions starting at `first_dim`."""
        return torch.as_tensor(encode_values(self.discretizer, values, first_dim))

    def _append(self, rows: _Rows, logits: torch.Tensor, local: torch.Tensor, dim: int) -> None:
        """Append local classes `local` of dimension `dim` (stop for terminated rows), count their log-prob."""
        local = torch.where(rows.alive, local, self.N)
        rows.logp += logits.log_softmax(-1).gather(1, local[:, None])[:, 0]
        if dim < self.dS:
            rows.alive &= local != self.N
        self.decoder.append(torch.where(local == self.N, self.stop_id, local + dim * self.N))

    def _critic_value(self, prefixes: list[torch.Tensor], t: int) -> torch.Tensor:
        """The critic's Q(s_t, a_t) for every row, from decoded midpoints: s_0 is the env's observation (the end
        of each env's prefix), later states are the rows' decoded observations; a stop token decodes as the last
        bin (its row is dead and keeps its score)."""
        gen, dS, dA, N, T = self.decoder.generated, self.dS, self.dA, self.N, self.T
        if t == 0:
            rows = len(gen) // len(prefixes)
            obs_ids = torch.cat([p[-dS:].to(gen.device).expand(rows, -1) for p in prefixes])
        else:
            obs_ids = gen[:, t * T - dS : t * T]
        act_ids = gen[:, t * T : t * T + dA]
        dims = torch.arange(T, device=gen.device)

        def values(ids: torch.Tensor, first: int) -> torch.Tensor:
            local = (ids - dims[first : first + ids.shape[1]] * N).clamp(0, N - 1)
            return self.midpoints[dims[first : first + ids.shape[1]], local].cpu()  # the critic runs on the CPU

        return self.critic(values(obs_ids, 0), values(act_ids, dS)).to(self.device, self.midpoints.dtype)

    def _rank(self, rows: _Rows) -> torch.Tensor:
        if self.cfg.objective in ("reward", "critic"):
            return rows.score
        if self.cfg.objective == "likelihood":
            return rows.logp
        n_tokens = self.decoder.generated.shape[1]
        return rows.score + self.cfg.penalty_lambda * rows.logp / n_tokens  # score - lambda * mean NLL

    @torch.inference_mode()
    def search(self, prefixes: list[torch.Tensor], generators: list[torch.Generator],
               carried: list[CarriedCache] | None = None) -> list[Plan]:
        """Plan for each env from its prefix (token ids: past transitions, then the current observation), or from
        its carried cache with the current observation as its prefix (`carried`, a cached window model's).
        Everything but the random noise of the draws (CPU generators, one per env) stays on the model's device, and
        no step reads a value back to the host, so a GPU search runs without round trips."""
        cfg, N, dS, dA = self.cfg, self.N, self.dS, self.dA
        B, E, H = cfg.beam_width, cfg.n_expand, cfg.horizon
        K = len(prefixes)
        dtype, device = self.midpoints.dtype, self.device
        dec = self.decoder

        def next_logits() -> torch.Tensor:
            return dec.logits().to(dtype)

        ahead = None
        if draw_ahead(device):  # every draw of the search, in order: dA actions a step, then dS observations
            shapes = [shape for t in range(H) for shape in [(B * E, N + 1)] * dA
                      + ([(B, N + 1)] * dS if t < H - 1 and cfg.k_obs != 1 else [])]
            ahead = NoiseAhead(shapes, generators, dtype, pin=device.type == "cuda")
        dec.start(prefixes, K * B * E, carried)
        dec.reorder(torch.arange(K, device=device).repeat_interleave(B))  # tile each prefix B times
        n = B
        zeros = torch.zeros(K * B, dtype=dtype, device=device)
        per_step = torch.zeros(K * B, H, dtype=dtype, device=device)
        rows = _Rows(zeros, zeros.clone(), zeros.clone(), torch.ones(K * B, dtype=torch.bool, device=device),
                     per_step, per_step.clone())
        for t in range(H):
            expand = _env_rows(K, n, (torch.arange(n * E, device=device) % n).expand(K, -1))  # repeat within each env
            dec.reorder(expand)
            rows.take(expand)
            n *= E
            for j in range(dA):
                logits = next_logits()
                filtered = logits.clone()
                filtered[:, N] = NEG_INF  # never an action's stop
                if cfg.cdf_act is not None:
                    filtered = filter_cdf(filtered, cfg.cdf_act)
                if cfg.k_act is not None:
                    filtered = filter_top_k(filtered, cfg.k_act)
                self._append(rows, logits, draw_per_env(filtered.softmax(-1), generators, ahead), dS + j)
            expected = []
            for j in range(2):  # reward, then value: argmax token, expectation over the renormalised bins
                logits = next_logits()
                bins = logits[:, :N]
                expected.append(bins.softmax(-1) @ self.midpoints[self.T - 2 + j])
                self._append(rows, logits, bins.argmax(-1), dS + dA + j)
            r, v = expected
            ret = rows.ret + self.discount**t * r
            if cfg.objective == "critic":  # sum_{i<t} gamma^i r_i + gamma^t Q(s_t, a_t) from the external critic
                q = self._critic_value(prefixes, t)
                rows.score = torch.where(rows.alive, rows.ret + self.discount**t * q, rows.score)
            else:
                rows.score = torch.where(rows.alive, ret + self.discount ** (t + 1) * v, rows.score)
            rows.ret = torch.where(rows.alive, ret, rows.ret)
            nan = torch.full_like(r, float("nan"))  # after a predicted termination (Plan: NaN marks those steps)
            rows.rewards[:, t], rows.values[:, t] = torch.where(rows.alive, r, nan), torch.where(rows.alive, v, nan)
            best = self._rank(rows).view(K, n).sort(dim=-1, descending=True, stable=True).indices[:, :B]
            keep = _env_rows(K, n, best)
            dec.reorder(keep)
            rows.take(keep)
            n = B
            if t < H - 1:
                for j in range(dS):
                    logits = next_logits()
                    if cfg.k_obs == 1:
                        local = logits.argmax(-1)
                    else:
                        local = draw_per_env(filter_top_k(logits, cfg.k_obs).softmax(-1), generators, ahead)
                    self._append(rows, logits, local, j)
        if ahead is not None:
            ahead.close()
        first = torch.arange(K, device=device) * B  # rows are sorted best-first within each env
        rows.take(first)
        best = _Rows(*(getattr(rows, f.name).cpu() for f in dataclasses.fields(rows)))
        return self._plans(dec.generated[first].cpu(), best)

    def _plans(self, generated: torch.Tensor, rows: _Rows) -> list[Plan]:
        """Decode the best rows' tokens (per step [a, r, V, s']) and search state, one row per env, into Plans."""
        H, dS, dA = self.cfg.horizon, self.dS, self.dA
        steps = F.pad(generated, (0, dS), value=self.stop_id).view(len(generated), H, self.T)
        standard = torch.roll(steps, dS, dims=-1).numpy()  # [s', a, r, V]
        stop = standard == self.stop_id
        decoded = self.discretizer.decode(np.where(stop, 0, standard % self.N))
        decoded[stop] = np.nan
        rank = self._rank(rows)
        plans = []
        for k in range(len(generated)):
            alive = ~stop[k, :, :dS].any(-1)
            n_steps = H if alive[:-1].all() else int(np.argmin(alive[:-1])) + 1
            plans.append(Plan(
                actions=decoded[k, :, dS : dS + dA],
                action_tokens=standard[k, :, dS : dS + dA],
                next_observations=decoded[k, :-1, :dS],
                rewards=rows.rewards[k].double().numpy(),
                values=rows.values[k].double().numpy(),
                log_likelihood=float(rows.logp[k]),
                score=float(rank[k]),
                steps=n_steps,
            ))
        return plans


def plan_config(run: Run, overrides: list[str] | tuple[str, ...] = ()) -> PlanConfig:
    """The run's [plan] section with `plan.key=value` overrides applied and validated, carry_context none resolved
    to whether the model can carry (a window model). An absolute model trained on
    windows shorter than the [plan]'s context (the official 5 transitions) plans with the context its windows hold,
    as the evaluation protocol does, unless plan.max_context_transitions is set explicitly."""
    for item in overrides:
        if not item.strip().startswith("plan."):
            raise ValueError(f"--set {item!r}: only plan.* keys can be changed when planning (e.g. plan.horizon=5)")
    raw = {"plan": dataclasses.asdict(run.config.plan), "model": {"attention": run.model.config.attention}}
    cfg = config_from_dict(apply_overrides(raw, list(overrides))).plan
    cfg.carry_context = carries(cfg, run.model.config.attention)  # validated against the model above
    explicit = any(item.split("=", 1)[0].strip() == "plan.max_context_transitions" for item in overrides)
    if not explicit:
        cfg.max_context_transitions = run.model.config.fit_context(cfg.max_context_transitions)
    return cfg


class Planner:
    """Model-predictive control of n_envs environments: per-env context, random stream and current plan;
    all envs that need a new plan are searched together in one batch."""

    def __init__(self, search: BeamSearch, obs_indices: np.ndarray, n_envs: int = 1, raw_obs_dim: int | None = None):
        self.search = search
        self.obs_indices = np.asarray(obs_indices, dtype=np.int64)
        self.raw_obs_dim = raw_obs_dim  # the env observation's size, where the run records it
        self.n_envs = n_envs
        # A carried context keeps the whole episode: the cache is rebuilt from it on restore, and the uncached
        # reference plans from all of it.
        mct = None if search.carry else search.cfg.max_context_transitions
        self.contexts = [deque(maxlen=mct) for _ in range(n_envs)]
        cached = isinstance(search.decoder, CachedDecoder)
        self.carried = [CarriedCache(search.model) for _ in range(n_envs)] if search.carry and cached else None
        self.generators = [torch.Generator().manual_seed(i) for i in range(n_envs)]
        self.plans: list[Plan | None] = [None] * n_envs
        self.offsets = [0] * n_envs
        self.pending: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * n_envs
        self.last_plans: list[Plan | None] = [None] * n_envs  # the plan made at each env's latest replanning

    @classmethod
    def from_run(cls, run: Run, plan_cfg: PlanConfig | None = None, n_envs: int = 1, cached: bool = True,
                 critic: Critic | None = None, dtype: torch.dtype | None = None) -> Planner:
        """A planner for a loaded run (its [plan] settings unless `plan_cfg` is given); the model computes in
        `dtype`, by default plan.dtype."""
        plan_cfg = plan_cfg or run.config.plan
        device = usable_device("plan.device", plan_cfg.device)
        dtype = dtype or getattr(torch, plan_cfg.dtype)
        if dtype == torch.bfloat16 and not native_bf16(device):
            how = ("the weight matmuls run in float32 on bf16 values and the rest is emulated, at about float32's speed"
                   if device.type == "cpu" else "planning runs several times slower than in float32")
            warnings.warn(f"plan.dtype = bfloat16 on {plan_cfg.device}, which has no native bf16 matmuls: {how}; "
                          "set plan.dtype=float32", stacklevel=2)
        model = run.model
        if any(p.dtype != dtype or p.device != device for p in model.parameters()):  # the run's own stays as it is
            model = copy.deepcopy(model).to(device, dtype)
        search = BeamSearch(model.eval(), run.discretizer, plan_cfg, run.config.data.discount, cached, critic)
        return cls(search, run.obs_indices, n_envs, run.meta.get("raw_obs_dim"))

    def reset(self, env: int = 0, seed: int = 0) -> None:
        """Start a new episode in slot `env`: empty context, the random stream seeded with `seed`."""
        self.contexts[env].clear()
        if self.carried is not None:
            self.carried[env].clear()
        self.generators[env].manual_seed(seed)
        self.plans[env], self.pending[env], self.last_plans[env], self.offsets[env] = None, None, None, 0

    def _obs_tokens(self, obs: np.ndarray) -> torch.Tensor:
        obs = np.asarray(obs, dtype=np.float64)
        size = obs.shape[0] if obs.ndim == 1 else None
        if size is None or size <= self.obs_indices.max() or (self.raw_obs_dim and size != self.raw_obs_dim):
            want = self.raw_obs_dim or f"more than {self.obs_indices.max()}"
            raise ValueError(f"observation of shape {obs.shape}, the run was trained on {want}-dim observations; "
                             "pass one env's observation from the environment the run was trained on")
        return self.search.tokens(obs[self.obs_indices], 0)

    def plan_batch(self, envs: list[int], observations: np.ndarray) -> list[Plan]:
        """Plans for envs `envs` from their current observations (raw, before selection); no action is taken."""
        obs = [self._obs_tokens(o) for o in observations]
        generators = [self.generators[e] for e in envs]
        if self.carried is not None:  # each env's executed transitions carried, then its observation
            for e in envs:
                self.carried[e].extend(torch.cat([torch.zeros(0, dtype=torch.long), *self.contexts[e]]))
            return self.search.search(obs, generators, [self.carried[e] for e in envs])
        prefixes = [torch.cat([*self.contexts[e], tokens]) for e, tokens in zip(envs, obs, strict=True)]
        return self.search.search(prefixes, generators)

    def act_batch(self, envs: list[int], observations: np.ndarray) -> np.ndarray:
        """Actions (len(envs), dA) for envs `envs`, replanning those whose plan is used up (plan_freq)."""
        freq = self.search.cfg.plan_freq
        twice = [e for e in envs if self.pending[e] is not None]
        if twice:  # before any replanning, which would move the env's plan and random stream
            raise ValueError(f"env {twice[0]}: act() called twice without observe(reward); record each step's reward")
        replan = [i for i, e in enumerate(envs) if self.plans[e] is None
                  or self.offsets[e] >= min(freq, self.plans[e].steps)]
        if replan:
            plans = self.plan_batch([envs[i] for i in replan], np.asarray(observations)[replan])
            for i, plan in zip(replan, plans, strict=True):
                self.plans[envs[i]], self.last_plans[envs[i]], self.offsets[envs[i]] = plan, plan, 0
        actions = []
        for e, obs in zip(envs, observations, strict=True):
            plan, i = self.plans[e], self.offsets[e]
            self.pending[e] = (self._obs_tokens(obs), torch.as_tensor(plan.action_tokens[i]))
            self.offsets[e] += 1
            actions.append(plan.actions[i])
        return np.stack(actions)

    def observe_batch(self, envs: list[int], rewards: np.ndarray) -> None:
        """Record the rewards of the actions just taken, completing each env's context transition."""
        for e, reward in zip(envs, rewards, strict=True):
            if self.pending[e] is None:
                raise ValueError(f"env {e}: observe() called before act(); call act(obs) first")
            obs_tokens, action_tokens = self.pending[e]
            search = self.search
            reward_token = search.tokens([float(reward)], search.dS + search.dA)
            value_placeholder = search.tokens([VALUE_PLACEHOLDER], search.T - 1)  # official; never attended
            self.contexts[e].append(torch.cat([obs_tokens, action_tokens, reward_token, value_placeholder]))
            self.pending[e] = None

    def state(self, env: int) -> dict:
        """Env slot `env` between steps as plain JSON data (context tokens, random stream, current plan), so an
        interrupted evaluation can go on exactly where it stopped (`restore`)."""
        if self.pending[env] is not None:
            raise ValueError(f"env {env}: state() between act() and observe(); take it after observe(reward)")
        plan = self.plans[env]
        return {
            "context": [tokens.tolist() for tokens in self.contexts[env]],
            "generator": base64.b64encode(self.generators[env].get_state().numpy().tobytes()).decode(),
            "offset": self.offsets[env],
            "plan": None if plan is None else {f.name: (v.tolist() if isinstance(v := getattr(plan, f.name), np.ndarray)
                                                        else v) for f in dataclasses.fields(plan)},
        }

    def restore(self, env: int, state: dict) -> None:
        """Put slot `env` back in a state taken by `state`."""
        self.contexts[env].clear()
        self.contexts[env].extend(torch.tensor(tokens, dtype=torch.long) for tokens in state["context"])
        if self.carried is not None:  # rebuilt from the episode's tokens at the next search, as it was built
            self.carried[env].clear()
        raw = np.frombuffer(base64.b64decode(state["generator"]), dtype=np.uint8).copy()
        self.generators[env].set_state(torch.from_numpy(raw))
        plan = state["plan"]
        if plan is not None:
            plan = Plan(**{k: np.asarray(v, dtype=np.int64 if k == "action_tokens" else np.float64)
                           if isinstance(v, list) else v for k, v in plan.items()})
            plan.next_observations = plan.next_observations.reshape(-1, self.search.dS)  # (0, dS) at horizon 1
        self.plans[env], self.last_plans[env], self.offsets[env], self.pending[env] = plan, plan, state["offset"], None

    def act(self, obs: np.ndarray, env: int = 0) -> np.ndarray:
        """The action (dA,) for one env's observation; call observe(reward) after stepping the env."""
        return self.act_batch([env], np.asarray(obs)[None])[0]

    def observe(self, reward: float, env: int = 0) -> None:
        """Record the reward of one env's last action."""
        self.observe_batch([env], np.array([reward]))

    def plan(self, obs: np.ndarray, env: int = 0) -> Plan:
        """The plan (predicted states, actions, rewards, values, log-likelihood) from one env's observation."""
        return self.plan_batch([env], np.asarray(obs)[None])[0]


def load_planner(run_dir: str | Path, overrides: list[str] | tuple[str, ...] = (), n_envs: int = 1,
                 cached: bool = True, weights: str = "model.pt") -> Planner:
    """Load a run directory and build its planner, with `plan.key=value` overrides."""
    run = load_run(run_dir, weights=weights)
    return Planner.from_run(run, plan_config(run, overrides), n_envs=n_envs, cached=cached)
