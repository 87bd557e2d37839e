"""Print the distillation ablation table (README) from the eval JSONs written by
experiments/kd_ablation.sh plus the --no_constrain evals of the same checkpoints."""
import json
import os
import sys

ROWS = [("(a) plain training on gold", "out/kd_gold"), ("(b) hard-output KD", "out/kd_hard"),
        ("(c) soft KD over logits", "out/kd_soft"), ("(d) the teacher (small, 60 min)", "out/small60")]


def get(path, group, key):
    with open(path, encoding="utf-8") as f:
        v = json.load(f)["groups"][group][key]
    return "-" if v is None else f"{100 * v:.1f}%"


def main():
    print("| model | seen exact | unseen exact | valid (raw) | false call (raw) | seen exact, constrained "
          "| unseen exact, constrained | false call, constrained |")
    print("|---|---|---|---|---|---|---|---|")
    for name, d in ROWS:
        raw = os.path.join(d, "eval_test_raw.json" if d != "out/small60" else "eval_test.json")
        con = os.path.join(d, "eval_test.json" if d != "out/small60" else "eval_test_constrained.json")
        if not (os.path.isfile(raw) and os.path.isfile(con)):
            print(f"| {name} | (missing {raw} or {con}) |", file=sys.stderr)
            continue
        print(f"| {name} | {get(raw, 'seen', 'exact')} | {get(raw, 'unseen', 'exact')} | {get(raw, 'all', 'valid')} "
              f"| {get(raw, 'all', 'false_call')} | {get(con, 'seen', 'exact')} | {get(con, 'unseen', 'exact')} "
              f"| {get(con, 'all', 'false_call')} |")


if __name__ == "__main__":
    main()
