"""DPO vs IPO vs SimPO in the exact tabular token MDP: who converges to pi*?

Trains tabular policies with the registry's losses on the exact expected loss over all response
pairs (Bradley-Terry labels from the true reward, data policy pi_ref) and prints a markdown table
per MDP, then the implicit-reward decline from a chosen-fitted reference.

    /work/venv/bin/python experiments/tabular_qstar/run.py            # the README's table
    /work/venv/bin/python experiments/tabular_qstar/run.py --seeds 0 1 2 --sweep

Shape suffixes: ``p`` prompts, ``s`` responses, ``n`` nodes, ``v`` tokens.
"""

import argparse

import numpy as np

from prefopt_jax.tokenmdp import tabular

METHODS = (
    ("pi_ref", None, None),
    ("pi* (exact)", None, None),
    ("dpo", "dpo", "beta"),
    ("ipo", "ipo", "beta"),
    ("simpo", "simpo", None),
)


def _policies(mdp, pairs, steps):
    """Sequence log-probs and logits of every method, by name."""
    tree = mdp.tree
    out = {"pi_ref": mdp.ref_logits_pnv, "pi* (exact)": tabular.solve(mdp).logps_pnv}
    for name, loss, beta_key in METHODS[2:]:
        hyper = {beta_key: mdp.beta} if beta_key else {}
        res = tabular.fit(mdp, loss, pairs, hyper=hyper, steps=steps)
        out[name] = res.logits_pnv
        print(f"  {name}: loss {res.loss_i[-1]:.6f}, grad norm {res.grad_norm_i[-1]:.1e}")
    return {name: (tabular.sequence_logps(logits, tree), logits) for name, logits in out.items()}


def _top(seq_ps, rewards_ps, tree):
    """The most likely response of prompt 0, its probability and its reward rank (1 = best)."""
    s = int(np.argmax(seq_ps[0]))
    rank = int(np.sum(rewards_ps[0] > rewards_ps[0, s])) + 1
    return "".join("abcdefgh"[t] for t in tree.tokens_sh[s]), float(np.exp(seq_ps[0, s])), rank


def table(mdp, steps):
    """Markdown rows comparing the methods on one MDP."""
    tree, pairs = mdp.tree, tabular.all_pairs(mdp)
    sol = tabular.solve(mdp)
    ref_ps, star_ps = (tabular.sequence_logps(mdp.ref_logits_pnv, tree),
                       tabular.optimal_sequence_logps(mdp))
    rewards_ps = tabular.sequence_rewards(mdp)
    rows = ["| policy | KL(pi*‖pi) | KL(pi‖pi_ref) | win rate vs pi_ref | E[R] "
            "| max token residual | top response (p, reward rank) |",
            "|---|---|---|---|---|---|---|"]
    for name, (seq_ps, logits) in _policies(mdp, pairs, steps).items():
        residual = np.abs(tabular.identity_residual_pnv(mdp, sol.values_pm, logits)).max()
        top, prob, rank = _top(seq_ps, rewards_ps, tree)
        rows.append(
            f"| {name} | {tabular.kl(star_ps, seq_ps):.2e} | {tabular.kl(seq_ps, ref_ps):.3f} "
            f"| {tabular.win_rate(seq_ps, ref_ps, rewards_ps):.3f} "
            f"| {tabular.expected_reward(seq_ps, rewards_ps):.3f} | {residual:.1e} "
            f"| {top} ({prob:.2f}, {rank}) |")
    return "\n".join(rows)


def decline(mdp, steps):
    """Mean chosen / rejected implicit rewards under DPO from a reference = SFT on chosen."""
    tree, pairs = mdp.tree, tabular.all_pairs(mdp)
    sft_pnv = tabular.conditionals(tabular.chosen_logps(pairs, tree, mdp.num_prompts), tree)
    res = tabular.fit(mdp, "dpo", pairs, hyper={"beta": mdp.beta}, init_logits_pnv=sft_pnv,
                      ref_logits_pnv=sft_pnv, optimizer="adam", learning_rate=0.05, steps=steps)
    rows = ["| adam step | mean chosen b log pi/pi_ref | mean rejected | margin |",
            "|---|---|---|---|"]
    for i in (0, 10, 50, 100, steps - 1):
        c, r = res.chosen_reward_i[i], res.rejected_reward_i[i]
        rows.append(f"| {i} | {c:+.4f} | {r:+.4f} | {c - r:+.4f} |")
    return "\n".join(rows)


def sweep(mdp, steps):
    """How close IPO and SimPO get to pi* over their hyperparameters (none reaches it)."""
    tree, pairs = mdp.tree, tabular.all_pairs(mdp)
    star_ps = tabular.optimal_sequence_logps(mdp)
    ref_ps = tabular.sequence_logps(mdp.ref_logits_pnv, tree)
    grid = [("ipo", {"beta": b}) for b in (0.1, 0.2, 0.3, 0.5, 1.0, 2.0)]
    grid += [("simpo", {"beta": b, "gamma_beta_ratio": g})
             for b in (0.5, 1.0, 2.0, 5.0) for g in (0.0, 0.25, 0.5)]
    rows = ["| loss | hyper | KL(pi*‖pi) | KL(pi‖pi_ref) |", "|---|---|---|---|"]
    for loss, hyper in grid:
        res = tabular.fit(mdp, loss, pairs, hyper=hyper, steps=steps)
        seq_ps = tabular.sequence_logps(res.logits_pnv, tree)
        text = ", ".join(f"{k}={v}" for k, v in hyper.items())
        rows.append(f"| {loss} | {text} | {tabular.kl(star_ps, seq_ps):.3f} "
                    f"| {tabular.kl(seq_ps, ref_ps):.3f} |")
    return "\n".join(rows)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--vocab", type=int, default=3)
    parser.add_argument("--horizon", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--beta", type=float, default=1.0)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--sweep", action="store_true", help="IPO/SimPO hyperparameter sweep")
    args = parser.parse_args()
    for seed in args.seeds:
        mdp = tabular.random_mdp(args.vocab, args.horizon, args.prompts, beta=args.beta,
                                 reward_scale=1.0, ref_scale=0.5, seed=seed)
        print(f"\n### V={args.vocab} H={args.horizon} prompts={args.prompts} "
              f"b={args.beta} seed={seed}\n")
        print(table(mdp, args.steps))
        print("\nImplicit-reward decline (DPO, reference = SFT on chosen):\n")
        print(decline(mdp, args.steps))
        if args.sweep:
            print("\nIPO / SimPO hyperparameter sweep:\n")
            print(sweep(mdp, args.steps))


if __name__ == "__main__":
    main()
