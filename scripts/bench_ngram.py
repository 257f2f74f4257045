"""How fast and how good n-gram drafting is: python scripts/bench_ngram.py [--datastore DIR] [--pair demo] [--n 3]

(1) Per-call time of a chain lookup on sequences of 512 and 2048 tokens from held-out (`test`) documents:
    the stateless `NgramDrafter.chain(ids, k)` (a list in, as a decode loop holds it) and the
    incremental `NgramIndex.chain(k)`, each without and with the datastore, and the datastore path
    forced (a sequence with no repeated token); beside it, one target forward of the pair at that
    context (1 token, and k + 1 tokens as a verification does), on one thread.
(2) Teacher-forced quality: at every 4th position of held-out documents, how many leading tokens of
    the chain equal the real continuation, for the sequence alone, the datastore alone, "sequence,
    else datastore", and the drafter's rule (the longer match wins, the sequence on ties).
"""

import argparse
import json
import statistics
import sys
import time

import numpy as np
import torch

from sprinter.config import ArgumentParser
from sprinter.corpus import load_documents
from sprinter.decode.cache import CachedLM
from sprinter.decode.datastore import Datastore
from sprinter.decode.ngram import NgramDrafter
from sprinter.errors import SprinterError, run_cli
from sprinter.pairs.build import resolve_pair
from sprinter.pairs.load import load_model, load_tokenizer


def per_call_us(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def forward_us(target, context: list[int], new: int, repeats: int) -> float:
    lm = CachedLM(target, target.config.vocab_size)
    with torch.inference_mode():
        lm.append(torch.tensor([context[:-new]]))
        step = torch.tensor([context[-new:]])

        def run():
            lm.append(step, logits=new)
            lm.rollback(new)

        return per_call_us(run, repeats)


def agree(chain: list[int], truth: list[int]) -> int:
    k = 0
    while k < min(len(chain), len(truth)) and chain[k] == truth[k]:
        k += 1
    return k


def main(argv=None) -> None:
    parser = ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--datastore", default="checkpoints/datastores/demo", help="from scripts/build_datastore.py")
    parser.add_argument("--pair", default="demo", help="pair preset or folder (its tokenizer and target)")
    parser.add_argument("--n", type=int, default=3, help="longest n-gram")
    parser.add_argument("--k", type=int, default=8, help="chain length (tokens drafted per call)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048], help="sequence lengths to time")
    parser.add_argument("--repeats", type=int, default=300, help="timed calls per figure (median)")
    parser.add_argument("--docs", type=int, default=40, help="held-out documents for the quality figures")
    args = parser.parse_args(argv)
    for name in ("n", "k", "repeats", "docs"):
        if getattr(args, name) < 1:
            raise SprinterError(f"--{name}: got {getattr(args, name)}; expected an integer >= 1")
    if min(args.lengths) < 2:
        raise SprinterError(f"--lengths: got {args.lengths}; expected sequence lengths >= 2")
    torch.set_num_threads(1)
    target_path = resolve_pair(args.pair)[1]
    tok = load_tokenizer(target_path)
    ds = Datastore.open(args.datastore, tokenizer=tok)
    target = load_model(target_path, "target", torch.device("cpu"), torch.float32)
    docs = [tok(d.text, add_special_tokens=False)["input_ids"] for d in load_documents("stdlib", "test")[: args.docs]]
    stream = [t for d in docs for t in d]
    plain, with_ds = NgramDrafter(args.n), NgramDrafter(args.n, datastore=ds)

    timings = {}
    for length in args.lengths:
        ids = stream[:length]
        unique = np.random.default_rng(0).permutation(len(tok))[:length].tolist()  # no repeats: the datastore path
        row = {}
        # B023: per_call_us calls each lambda before returning, so the loop variables it reads are the current ones
        for name, drafter in (("chain", plain), ("chain+datastore", with_ds)):
            row[name] = per_call_us(lambda: drafter.chain(ids, args.k), args.repeats)  # noqa: B023
            index = drafter.index(ids)
            row[name.replace("chain", "index")] = per_call_us(lambda: index.chain(args.k), args.repeats)  # noqa: B023
        row["chain, datastore path forced"] = per_call_us(
            lambda: with_ds.chain(unique, args.k), args.repeats)  # noqa: B023
        context = stream[: min(length, target.config.n_positions - args.k - 1)]  # what the target's window allows
        row[f"target forward, 1 token after {len(context) - 1}"] = forward_us(target, context, 1, args.repeats // 3)
        row[f"target forward, {args.k + 1} tokens after {len(context) - 1}"] = forward_us(
            target, stream[: len(context) + args.k], args.k + 1, args.repeats // 3)
        timings[length] = {k: round(v, 1) for k, v in row.items()}
    print(json.dumps({"per_call_us": timings}, indent=1))

    rules = {"sequence": [], "datastore": [], "sequence, else datastore": [], "longest (the drafter)": []}
    for doc in docs:
        index, both = plain.index(doc[:32]), with_ds.index(doc[:32])
        for p in range(32, min(len(doc), 2048) - args.k, 4):
            index.extend(doc[len(index) : p])
            both.extend(doc[len(both) : p])
            truth, own = doc[p : p + args.k], index.chain(args.k)
            from_store = ds.chain(doc[p - args.n : p], args.k, args.n)
            for rule, chain in zip(rules, (own, from_store, own or from_store, both.chain(args.k))):
                rules[rule].append(agree(chain, truth))
    quality = {rule: round(float(np.mean(v)), 3) for rule, v in rules.items()}
    print(json.dumps({"mean_matching_tokens_per_chain": quality, "positions": len(rules["sequence"]),
                      "n": args.n, "k": args.k}, indent=1))


if __name__ == "__main__":
    sys.exit(run_cli(main))
