"""Markdown tables from the JSON files benchmarks/foundation.sh keeps (one folder per model).
usage: python benchmarks/report.py benchmarks/results/NAME [more folders...]"""
import json
import sys
from pathlib import Path


def f(v, nd=3):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.{nd}f}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def load(folder):
    return {p.stem: json.loads(p.read_text()) for p in sorted(Path(folder).glob("*.json"))}


def report(folder):
    r = load(folder)
    name = Path(folder).name
    out = [f"### {name}", ""]
    ppl = [(k, v) for k, v in r.items() if "perplexity" in v]
    if ppl:
        out += ["| protocol | ctx | windows | tokens scored | text tokens | perplexity | ± | eval tok/s |",
                "|---|---|---|---|---|---|---|---|"]
        out += [f"| {v['protocol']} | {v['ctx']} | {v['windows']} | {f(v['tokens'])} | {f(v['text_tokens'])} | "
                f"{f(v['perplexity'], 4)} | {f(v['perplexity_stderr'], 3)} | {f(v['eval_tokens_per_s'], 0)} |"
                for _, v in ppl]
        out.append("")
    if "tasks" in r:
        t = r["tasks"]
        out += ["| task | n | acc | ± | acc_norm | ± |", "|---|---|---|---|---|---|"]
        out += [f"| {k} | {v['n']} | {f(v['acc'])} | {f(v['acc_stderr'])} | {f(v['acc_norm'])} | "
                f"{f(v['acc_norm_stderr'])} |" for k, v in t["tasks"].items()]
        out += [f"| **average** | {sum(v['n'] for v in t['tasks'].values())} | **{f(t['average_acc'])}** | | "
                f"**{f(t['average_acc_norm'])}** | |", ""]
    benches = [v for k, v in r.items() if k.startswith("bench")]
    if benches:
        out += ["| threads | batch | prefill tok/s | decode tok/s | TTFT s | size MiB | bits/weight | memory MiB | "
                "peak RSS MiB | load s | J/token |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        out += [f"| {b['threads']} | {b['batch']} | {f(b['prefill_tokens_per_s'], 1)} | "
                f"{f(b['decode_tokens_per_s'], 1)} | {f(b['ttft_s'], 3)} | {f(b['size_bytes'] / 2**20, 1)} | "
                f"{f(b['bits_per_weight'], 2)} | {f(b['memory_bytes'] / 2**20, 1)} | "
                f"{f(b['peak_rss_bytes'] / 2**20, 0)} | {f(b['load_s'], 2)} | {f(b['energy_j_per_token'], 3)} |"
                for b in benches]
        m = benches[0]["machine"]
        out += ["", f"Energy: {benches[0]['energy_source']}. Machine: {m.get('cpu')}, {m.get('logical_cores')} "
                f"logical cores, torch {m.get('torch')}, transformers {m.get('transformers')}.", ""]
    out += ["Commands:", "", "```"] + [v["command"] for v in r.values() if "command" in v] + ["```", ""]
    return "\n".join(out)


if __name__ == "__main__":
    print("\n".join(report(d) for d in sys.argv[1:]))
