"""The pair cache: deterministic chunks, exact resumption after a crash, refusal of mixed settings, corruption
detection, and pairs that really are the teacher's ODE solutions."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from jumpflow.distill import PairCache, Teacher, generate_pairs
from jumpflow.errors import JumpflowError
from tests.distill.test_teacher import GAUSSIAN, trained_teacher_run  # noqa: F401  (a fixture, shared)
from tests.gaussian import ExactGaussian

N, CHUNK, STEPS = 1000, 256, 4  # 3 full chunks and a last one of 232 pairs
CLASS_MEANS = torch.tensor([[2.0, 0.0], [-2.0, 0.0], [0.0, 3.0]], dtype=torch.float64)


class Interrupted(Exception):
    pass


def gaussian_teacher(fail_at_call=None) -> Teacher:
    """The exact Gaussian field; with `fail_at_call`, the velocity raises on that call (a crash mid-generation)."""
    calls = [0]

    def velocity(z, t, labels):
        calls[0] += 1
        if calls[0] == fail_at_call:
            raise Interrupted
        return GAUSSIAN.velocity(z, t).to(z.dtype)

    return Teacher.from_velocity(velocity, (2,), teacher_id="exact-gaussian")


def class_teacher() -> Teacher:
    """Three classes, each its own exact Gaussian N(mean_c, 0.25 I): the label decides where the ODE lands."""
    fields = [ExactGaussian(mean, 0.5) for mean in CLASS_MEANS]

    def velocity(z, t, labels):
        v = torch.stack([f.velocity(z, t) for f in fields])  # (classes, N, 2)
        return v[labels, torch.arange(len(z))].to(z.dtype)

    return Teacher.from_velocity(velocity, (2,), num_classes=3, teacher_id="three-gaussians")


def make(directory, teacher=None, n=N, **options):
    settings = {"steps": STEPS, "chunk_size": CHUNK, "batch_size": 128, "progress": False, **options}
    return generate_pairs(teacher or gaussian_teacher(), directory, n, **settings)


def assert_same_cache(a: PairCache, b: PairCache):
    timing = "generation_seconds"  # wall time spent, summed over resumes: the one field allowed to differ
    assert a.manifest[timing] > 0 and b.manifest[timing] > 0
    assert {k: v for k, v in a.manifest.items() if k != timing} == {k: v for k, v in b.manifest.items() if k != timing}
    assert len(a) == len(b)
    for i in range(a.num_chunks):
        for x, y in zip(a.chunk(i), b.chunk(i)):
            assert (x is None and y is None) or torch.equal(x, y)


def snapshot(directory: Path) -> dict:
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(Path(directory).iterdir())}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> PairCache:
    """An uninterrupted generation of N pairs."""
    return make(tmp_path_factory.mktemp("reference"))


def test_cache_layout_and_contents(reference):
    assert len(reference) == N and reference.num_chunks == 4
    names = sorted(p.name for p in reference.directory.iterdir())
    assert names == ["chunk_00000.safetensors", "chunk_00001.safetensors", "chunk_00002.safetensors",
                     "chunk_00003.safetensors", "manifest.json"]
    manifest = json.loads((reference.directory / "manifest.json").read_text())
    assert {k: manifest[k] for k in ("teacher_id", "solver", "steps", "seed", "chunk_size", "pairs", "shape")} == {
        "teacher_id": "exact-gaussian", "solver": "euler", "steps": STEPS, "seed": 0, "chunk_size": CHUNK,
        "pairs": N, "shape": [2]}
    noise, sample, labels = reference.load_all()
    assert noise.shape == sample.shape == (N, 2) and noise.dtype == sample.dtype == torch.float32
    assert labels is None
    assert torch.unique(noise, dim=0).shape[0] == N  # no chunk repeats another's noise
    assert abs(noise.mean().item()) < 0.1 and abs(noise.std().item() - 1) < 0.1


def test_pairs_are_the_teachers_ode_solutions(reference):
    noise, sample, _ = reference.chunk(1)
    teacher = gaussian_teacher()
    assert torch.equal(sample, teacher.sample(noise, STEPS, solver="euler"))
    assert not torch.equal(sample, teacher.sample(noise, STEPS, solver="heun"))  # the solver is really used
    heun = make(reference.directory.parent / "heun", solver="heun", n=CHUNK)
    noise, sample, _ = heun.chunk(0)
    assert torch.equal(noise, reference.chunk(0).noise)  # same seed: same noise, whatever the solver
    assert torch.equal(sample, teacher.sample(noise, STEPS, solver="heun"))


def test_interrupted_generation_resumes_to_the_uninterrupted_cache(reference, tmp_path):
    # 128-pair batches, 4 Euler steps: 8 velocity calls per chunk; call 21 is in the third chunk's second batch
    with pytest.raises(Interrupted):
        make(tmp_path, gaussian_teacher(fail_at_call=21))
    assert sorted(p.name for p in tmp_path.glob("chunk_*")) == ["chunk_00000.safetensors", "chunk_00001.safetensors"]
    with pytest.raises(JumpflowError, match="chunk_00002.safetensors is missing.*incomplete"):
        PairCache.open(tmp_path)
    # a crash during a write leaves a temporary file: never read, then overwritten or removed
    (tmp_path / "chunk_00002.safetensors.tmp").write_bytes(b"half a chunk")
    (tmp_path / "chunk_00007.safetensors.tmp").write_bytes(b"from a bigger, abandoned request")
    resumed = make(tmp_path)
    assert_same_cache(resumed, reference)
    assert not list(tmp_path.glob("*.tmp"))
    noise = resumed.load_all().noise
    assert len(resumed) == N and torch.unique(noise, dim=0).shape[0] == N


def test_resume_writes_only_missing_chunks(reference, tmp_path):
    make(tmp_path)
    before = snapshot(tmp_path)
    (tmp_path / "chunk_00001.safetensors").unlink()
    with pytest.raises(JumpflowError, match="chunk_00001.safetensors is missing: chunks after it exist"):
        PairCache.open(tmp_path)
    calls = []
    counting = gaussian_teacher()
    counting.velocity_fn = lambda z, t, y, f=counting.velocity_fn: calls.append(len(z)) or f(z, t, y)
    assert_same_cache(make(tmp_path, counting), reference)
    assert sum(calls) == CHUNK * STEPS  # one chunk's worth of work
    after = snapshot(tmp_path)
    rewritten = ("chunk_00001.safetensors", "manifest.json")  # the manifest adds the regeneration's time
    assert {k: v for k, v in after.items() if k not in rewritten} == \
        {k: v for k, v in before.items() if k not in rewritten}


def test_growing_n_appends_the_same_pairs(reference, tmp_path):
    # its last chunk holds 89 pairs: noise drawn for 89 rows alone would not be a prefix of 256 rows' noise
    small = make(tmp_path, n=601)
    assert len(small) == 601
    first = small.load_all()
    grown = make(tmp_path, n=N)
    assert_same_cache(grown, reference)
    assert torch.equal(grown.load_all().noise[:601], first.noise)
    assert len(make(tmp_path, n=10)) == N  # asking for fewer leaves the cache as it is


def test_other_settings_are_refused_without_touching_files(reference, tmp_path):
    make(tmp_path, n=300)
    before = snapshot(tmp_path)
    with pytest.raises(JumpflowError, match=r"solver \(cache: 'euler', requested: 'heun'\); steps"):
        make(tmp_path, n=300, solver="heun", steps=8)
    with pytest.raises(JumpflowError, match="teacher_id"):
        make(tmp_path, n=600, teacher_id="another-teacher")
    for change in ({"seed": 1}, {"chunk_size": 100}):
        with pytest.raises(JumpflowError, match=next(iter(change))):
            make(tmp_path, n=600, **change)
    with pytest.raises(JumpflowError, match="shape"):
        make(tmp_path, Teacher.from_velocity(lambda z, t, y: z, (3,), teacher_id="exact-gaussian"))
    with pytest.raises(JumpflowError, match="teacher_id"):
        generate_pairs(Teacher.from_velocity(lambda z, t, y: z, (2,)), tmp_path / "nameless", 10, 2)
    assert snapshot(tmp_path) == before


def test_corrupt_and_wrong_chunks_are_detected(reference, tmp_path):
    make(tmp_path)
    chunk = tmp_path / "chunk_00002.safetensors"
    good = chunk.read_bytes()

    chunk.write_bytes(good[:-100])  # truncated
    with pytest.raises(JumpflowError, match="chunk_00002.safetensors is corrupt"):
        PairCache.open(tmp_path)
    with pytest.raises(JumpflowError, match="chunk_00002.safetensors is corrupt"):
        make(tmp_path)  # generation refuses too, rather than silently replacing a file
    assert chunk.read_bytes() == good[:-100]

    flipped = bytearray(good)
    flipped[-5] ^= 0xFF  # one byte of sample data: the header is fine, the checksum is not
    chunk.write_bytes(bytes(flipped))
    cache = PairCache.open(tmp_path)
    with pytest.raises(JumpflowError, match="chunk_00002.safetensors is corrupt.*sha256"):
        cache.load_all()

    wrong = reference.chunk(2)  # a chunk of the wrong length, with believable metadata
    save_file({"noise": wrong.noise[:10].contiguous(), "sample": wrong.sample[:10].contiguous()}, str(chunk),
              metadata={"format": "jumpflow-pairs-1", "index": "2", "rows": "10", "sha256": "-"})
    with pytest.raises(JumpflowError, match="chunk_00002.safetensors holds 10 pairs, expected 256"):
        PairCache.open(tmp_path)
    save_file({"noise": torch.zeros(256, 3), "sample": torch.zeros(256, 3)}, str(chunk),
              metadata={"format": "jumpflow-pairs-1", "index": "2", "rows": "256", "sha256": "-"})
    with pytest.raises(JumpflowError, match=r"chunk_00002.safetensors does not match.*expected F32 \(256, 2\)"):
        PairCache.open(tmp_path)

    with pytest.raises(JumpflowError, match="no manifest.json"):
        PairCache.open(tmp_path / "nowhere")
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(JumpflowError, match="manifest.*unreadable"):
        PairCache.open(tmp_path)


def test_class_conditional_pairs_carry_their_labels_to_the_teacher(tmp_path):
    cache = make(tmp_path, class_teacher(), n=600, solver="heun", steps=20)
    noise, sample, labels = cache.load_all()
    assert labels.dtype == torch.int64 and labels.shape == (600,)
    assert labels.min() >= 0 and labels.max() < 3
    assert torch.bincount(labels, minlength=3).min() > 150  # uniform over the classes
    # each pair lands where its own class's exact flow map sends its noise
    ones = torch.ones(len(noise), dtype=torch.float64)
    for c, mean in enumerate(CLASS_MEANS):
        rows = labels == c
        exact = ExactGaussian(mean, 0.5).flow_map(noise[rows].double(), ones[rows], 0 * ones[rows])
        assert (sample[rows].double() - exact).norm(dim=1).max().item() < 5e-3  # a wrong class: ~4
    assert torch.equal(cache.chunk(1).labels, labels[CHUNK:2 * CHUNK])


def test_sample_batch_draws_real_pairs_reproducibly(reference):
    a = reference.sample_batch(64, torch.Generator().manual_seed(5))
    b = reference.sample_batch(64, torch.Generator().manual_seed(5))
    assert all(torch.equal(x, y) for x, y in zip(a[:2], b[:2])) and a.labels is None
    noise, sample, _ = reference.load_all()
    rows = (a.noise[:, None, :] == noise[None]).all(-1).float().argmax(1)  # where each drawn pair sits
    assert torch.equal(noise[rows], a.noise) and torch.equal(sample[rows], a.sample)
    assert not torch.equal(a.noise, reference.sample_batch(64, torch.Generator().manual_seed(6)).noise)


def test_a_checkpoint_teacher_is_recorded_in_the_manifest(trained_teacher_run, tmp_path):  # noqa: F811
    teacher = Teacher.from_checkpoint(trained_teacher_run, device="cpu")
    cache = generate_pairs(teacher, tmp_path, 40, 3, chunk_size=16, progress=False)
    manifest = cache.manifest
    assert manifest["teacher_id"] == teacher.id == f"sha256:{teacher.sha256}"
    assert manifest["teacher"]["checkpoint"] == str(teacher.checkpoint) and manifest["teacher"]["step"] == 20
    assert manifest["num_classes"] == 3 and manifest["scaler"]["mean"] == teacher.scaler.mean.tolist()
    noise, sample, labels = cache.chunk(2)  # the last, 8 pairs
    assert len(noise) == 8 and torch.equal(sample, teacher.sample(noise, 3, labels))
