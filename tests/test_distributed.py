"""The EMA codebook, dead-code restarts and k-means init under torch.distributed: two gloo CPU
processes with half a batch each match one process with the whole batch, and stay identical."""
import pathlib

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import vqvae

pytestmark = pytest.mark.usefixtures("seeded_single_thread")

WORLD_SIZE = 2


def ema_quantizer() -> vqvae.VectorQuantizer:
    torch.manual_seed(0)
    return vqvae.VectorQuantizer(8, 3, decay=0.9)


def ema_batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(4, 3, 5, generator=g) for _ in range(3)]  # (B, D, T), split along B


def rank_data(rank: int, n: int) -> torch.Tensor:
    """(1, 2, n) latents that differ between ranks: rank 1's lie 50 away from rank 0's."""
    return (torch.randn(n, 2) + torch.tensor([0.0, 50.0 * rank])).T[None]


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE)
    try:
        result = {}
        q = ema_quantizer().train()
        for z in ema_batches():
            q(z.chunk(WORLD_SIZE)[rank])
        result["ema"] = q.state_dict()

        # Codes 1-3 are never chosen; with decay 0.5 their usage drops below 0.1 at step 4.
        torch.manual_seed(10 + rank)
        q = vqvae.VectorQuantizer(4, 2, decay=0.5, dead_code_threshold=0.1).train()
        with torch.no_grad():
            q.codebook.copy_(torch.tensor([[0.0, 25.0], [1e3, 1e3], [-1e3, 1e3], [1e3, -1e3]]))
            q.ema_embed_sum.copy_(q.codebook)
        for _ in range(4):
            z = rank_data(rank, 16)
            q(z)
        result["restart"], result["restart_batch"] = q.state_dict(), z

        torch.manual_seed(20 + rank)
        q = vqvae.VectorQuantizer(4, 2, kmeans_init=True).train()
        z = rank_data(rank, 64)
        q(z)
        result["kmeans"], result["kmeans_batch"] = q.state_dict(), z
        torch.save(result, pathlib.Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Run the three scenarios once on two processes; each rank's results, as saved to files."""
    tmp = tmp_path_factory.mktemp("distributed")
    mp.spawn(_worker, args=(str(tmp / "init"), str(tmp)), nprocs=WORLD_SIZE, join=True)
    return [torch.load(tmp / f"rank{r}.pt", weights_only=True) for r in range(WORLD_SIZE)]


def test_two_processes_with_half_batches_match_one_process_with_the_whole_batch(ranks):
    q = ema_quantizer().train()
    for z in ema_batches():
        q(z)
    for name, expected in q.state_dict().items():
        for r in range(WORLD_SIZE):
            assert torch.allclose(ranks[r]["ema"][name].float(), expected.float(), atol=1e-6), (name, r)
    assert not torch.allclose(q.codebook, ema_quantizer().codebook)  # the codebook did move


def test_dead_code_restart_leaves_identical_codebooks_chosen_by_rank_0(ranks):
    a, b = (ranks[r]["restart"] for r in range(WORLD_SIZE))
    assert all(torch.equal(a[name], b[name]) for name in a), "ranks diverged"
    rows = ranks[0]["restart_batch"][0].T                                   # rank 0's latents (16, 2)
    for k in (1, 2, 3):
        assert (rows == a["codebook"][k]).all(1).any(), f"code {k} is not one of rank 0's latents"
    assert a["ema_cluster_size"][1:].tolist() == [1.0, 1.0, 1.0]


def test_kmeans_init_leaves_identical_codebooks_from_rank_0s_batch(ranks):
    a, b = ranks[0]["kmeans"]["codebook"], ranks[1]["kmeans"]["codebook"]
    assert torch.equal(a, b), "ranks diverged"
    own, other = (ranks[r]["kmeans_batch"][0].T for r in range(WORLD_SIZE))
    assert (torch.cdist(a, own).amin(1) < torch.cdist(a, other).amin(1)).all()  # centroids of rank 0's data
