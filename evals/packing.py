"""The k-shot prompts of one item, packed so that what they share is computed once.

An item's prompts at k = 0, 1, 2, 4, ... are nested: each k's examples start the next k's. Its tokenised prompts
(one (context, continuation) per choice and k, exactly as each would be scored alone) become a tree:

    trunk          the longest context (per_item), or the examples shared by the whole task (shared)
      k-node       what a k's choices share beyond the first `cut` trunk tokens (its question)
        leaf       one choice: the rest of its context (WinoGrande's choices differ there) and its continuation

The trunk runs first, as a plain causal sequence whose keys and values are kept (once per batch of items, or once
for a whole task when its examples are shared); then one packed row per item holds its k-nodes and leaves, each
token at the position it has in its own prompt and attending only to what precedes it there: the first `cut`
trunk tokens, its k-node, and its own leaf (a block mask and explicit positions). A token's view of the trunk is
cut at the longest common prefix of the token ids, not of the text, so a tokeniser that merges across an example
boundary changes what is shared, never the result: the log-likelihoods equal those of scoring each prompt alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

TRUNK, PADDING = 0, -1  # node ids: the trunk (the parent of every k-node), and padding


@dataclass
class Request:
    """One choice of one k-shot prompt, tokenised as lm-evaluation-harness does."""

    context: list[int]
    continuation: list[int]
    continuation_bytes: int  # UTF-8 bytes of the continuation's text: the task loss is bits per byte


@dataclass
class Prompt:
    k: int
    requests: list[Request]  # one per choice
    dropped_examples: int  # the oldest examples left out so that every choice fits the context
    truncated: bool  # even with no examples the contexts had to lose their oldest tokens


@dataclass
class Scored:
    """Where one request's continuation is predicted in a row: the indices whose logits predict `tokens`."""

    k: int
    choice: int
    at: list[int]
    tokens: list[int]


@dataclass
class Row:
    trunk: tuple[int, ...]  # run before the row, its keys and values attended to (the first `cut` of them)
    shared: bool = False  # the trunk is a task's shared examples, the same for many rows
    tokens: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    nodes: list[int] = field(default_factory=list)
    cuts: list[int] = field(default_factory=list)  # how many trunk tokens each token may see
    parent_of_node: list[int] = field(default_factory=lambda: [PADDING])  # the trunk's parent: none
    scored: list[Scored] = field(default_factory=list)

    def add(self, tokens: list[int], start: int, node: int, cut: int) -> list[int]:
        """Append tokens at positions start, start + 1, ...; returns their indices in the row."""
        first = len(self.tokens)
        self.tokens += tokens
        self.positions += range(start, start + len(tokens))
        self.nodes += [node] * len(tokens)
        self.cuts += [cut] * len(tokens)
        return list(range(first, len(self.tokens)))


def common_prefix(first: list[int] | tuple[int, ...], second: list[int] | tuple[int, ...]) -> int:
    length = min(len(first), len(second))
    for index in range(length):
        if first[index] != second[index]:
            return index
    return length


def tree_row(prompts: list[Prompt], shared_trunk: tuple[int, ...] | None = None) -> Row:
    """One row holding `prompts` (one item's, dropping the same number of examples) after a trunk: the task's
    `shared_trunk` when given, else the longest context."""
    trunk = shared_trunk if shared_trunk is not None else max(
        (tuple(r.context) for p in prompts for r in p.requests), key=len)
    row = Row(trunk, shared=shared_trunk is not None)
    for prompt in prompts:
        contexts = [request.context for request in prompt.requests]
        # At least one context token stays out of the trunk, so every first continuation token is predicted
        # from a token of this row (the trunk's own logits are never computed).
        cut = min(min(common_prefix(context, trunk), len(context) - 1) for context in contexts)
        rests = [context[cut:] for context in contexts]
        shared = min(common_prefix(rests[0], rest) for rest in rests)
        k_node = len(row.parent_of_node)
        row.parent_of_node.append(TRUNK)
        question = row.add(rests[0][:shared], cut, k_node, cut)
        for choice, (request, rest) in enumerate(zip(prompt.requests, rests)):
            leaf = len(row.parent_of_node)
            row.parent_of_node.append(k_node)
            fed = rest[shared:] + request.continuation[:-1]
            indices = question + row.add(fed, cut + shared, leaf, cut)
            # The continuation's token t is predicted at the token before it: the context's last, then its own.
            last_context = len(indices) - len(request.continuation)
            row.scored.append(Scored(prompt.k, choice, indices[last_context:], request.continuation))
    return row


def row_tensors(rows: list[Row], trunk_length: int, device: torch.device):
    """Token ids, positions and the attention mask (batch, time, trunk_length + time) of rows whose trunks'
    keys and values, padded to trunk_length, come first."""
    length = max(len(row.tokens) for row in rows)

    def padded(values: list[list[int]], fill: int) -> torch.Tensor:
        return torch.tensor([row + [fill] * (length - len(row)) for row in values], dtype=torch.long)

    tokens = padded([row.tokens for row in rows], 0)
    positions = padded([row.positions for row in rows], 0)
    nodes = padded([row.nodes for row in rows], PADDING)
    cuts = padded([row.cuts for row in rows], 0)
    parents = padded([[row.parent_of_node[node] for node in row.nodes] for row in rows], PADDING - 1)
    query_nodes, key_nodes = nodes[:, :, None], nodes[:, None, :]
    earlier = torch.ones(length, length, dtype=torch.bool).tril()
    query_parents = parents[:, :, None]
    in_row = ((key_nodes == query_nodes) & earlier) | ((key_nodes == query_parents) & (query_parents > TRUNK))
    in_trunk = torch.arange(trunk_length)[None, None, :] < cuts[:, :, None]
    return tokens.to(device), positions.to(device), torch.cat((in_trunk, in_row), dim=2).to(device)
