"""The public ReyNet graph helpers against the research pipeline that built the committed checkpoints' inputs."""

from __future__ import annotations

import torch

from hf_koopman.models.reynet import build_graph_tensor


def test_build_graph_tensor_reproduces_the_checkpoint_inputs():
    """Same tensor as the research pipeline that built the TU-benchmark (reynet-mutag) training inputs."""
    from research.data.graphs import GraphRecord, graph_to_tensor

    gen = torch.Generator().manual_seed(0)
    for n in (1, 4, 7):
        A = (torch.rand(n, n, generator=gen) < 0.4).triu(1)
        src, dst = A.nonzero().T
        edges = torch.stack((torch.cat((src, dst)), torch.cat((dst, src))))  # both directions, as in the TU files
        labels = torch.randint(0, 5, (n,), generator=gen)
        record = GraphRecord(num_nodes=n, label=0, node_labels=labels, edges=edges)
        expected = graph_to_tensor(record, 5)
        torch.testing.assert_close(build_graph_tensor(edges, num_nodes=n, node_labels=labels, num_node_labels=5),
                                   expected, rtol=0, atol=0)
        one_way = torch.stack((src, dst))  # one direction per edge is enough
        torch.testing.assert_close(build_graph_tensor(one_way, node_labels=labels, num_node_labels=5), expected)
