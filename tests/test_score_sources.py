"""``qmamba score`` beyond local files: WebDataset tar shards (written by the webdataset library), tables of paths
and URLs, and object storage through a real S3 API on 127.0.0.1 (moto's server). Every source gives the scores of
the same images scored as files one by one."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
from score_runs import bucket_parts, file_scores, parts_of, ray_cluster, rows_of, run_score

import qmamba


def test_shards_give_each_image_member_one_row_with_the_files_scores(trained, collection, tmp_path):
    shards, files = collection
    output = tmp_path / "scores.jsonl"
    assert run_score(trained, str(shards / "{000000..000003}.tar"), "-o", str(output)) == 1  # the corrupt member
    rows = rows_of(output)
    expected = file_scores(trained, files)
    scored = {k.split("#", 1)[1]: e["score"] for k, e in rows.items() if "score" in e}
    assert scored.keys() == expected.keys()  # metadata members are no rows
    np.testing.assert_allclose([scored[k] for k in expected], list(expected.values()), rtol=1e-6)
    assert all(k.startswith(str(shards)) and ".tar#" in k for k in rows)
    corrupt = rows[f"{shards / '000002.tar'}#corrupt.jpg"]
    assert "cannot read image" in corrupt["error"] and "000002.tar#corrupt.jpg" in corrupt["error"]
    text = rows[f"{shards / '000002.tar'}#text.png"]["error"]  # Pillow names what it cannot identify
    assert f"cannot identify image file '{shards / '000002.tar'}#text.png'" in text and " object at 0x" not in text
    assert run_score(trained, str(shards / "{000000..000003}.tar"), "-o", str(output)) == 1  # resumes: nothing twice
    assert len(output.read_text().splitlines()) == len(rows)

    from qmamba.inference.sources import expand  # the Python API: the same keys, and a Scorer reads them

    keys, missing = expand([str(shards / "{000000..000003}.tar")])
    assert missing == [] and sorted(keys) == sorted(rows)
    good = [k for k in keys if "score" in rows[k]]
    scorer = qmamba.load(trained[1] / "checkpoints" / "best.ckpt", device="cpu")
    np.testing.assert_allclose(scorer.score(good), [rows[k]["score"] for k in good], rtol=1e-6)


@pytest.mark.parametrize("kind", [".parquet", ".csv", ".jsonl"])
def test_a_table_of_paths_is_scored_by_its_column(trained, collection, tmp_path, kind, capsys):
    _, files = collection
    names = list(files)[:5]
    table = tmp_path / f"images{kind}"
    if kind == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"key": names, "url": [str(files[n]) for n in names]}), table)
    elif kind == ".csv":
        table.write_text("key,url\n" + "".join(f"{n},{files[n]}\n" for n in names))
    else:
        table.write_text("".join(json.dumps({"key": n, "url": str(files[n])}) + "\n" for n in names))
    output = tmp_path / "scores.jsonl"
    assert run_score(trained, str(table), "-o", str(output)) == 0  # no path column: url
    expected = file_scores(trained, {n: files[n] for n in names})
    rows = rows_of(output)
    np.testing.assert_allclose([rows[str(files[n])]["score"] for n in names], list(expected.values()), rtol=1e-6)
    assert run_score(trained, str(table), "--column", "picture", "-o", str(tmp_path / "other.jsonl")) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"qmamba: error: the table {table} has no column picture (its columns: key, url); name the one "
                       "with the images with --column")


def test_tables_with_a_byte_order_mark_or_no_rows_and_paths_spelled_twice(trained, collection, tmp_path, capsys,
                                                                          monkeypatch):
    """A spreadsheet's CSV starts with a UTF-8 BOM (it was "no column path (its columns: \\ufeffpath)"); an empty
    table is one line whatever its format (an empty CSV and an empty Parquet table once disagreed); ./a, a and /abs/a
    are one image (each was scored)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    _, files = collection
    monkeypatch.chdir(tmp_path)
    image = next(iter(files.values()))
    (tmp_path / "a.png").write_bytes(image.read_bytes())
    table = tmp_path / "excel.csv"
    table.write_bytes("\ufeffpath,score\n".encode() + f"{image},3\n".encode())
    assert run_score(trained, str(table), "-o", "bom.jsonl") == 0 and list(rows_of(tmp_path / "bom.jsonl")) == [
        str(image)]
    empties = {"empty.csv": b"", "header.csv": b"path\n", "empty.jsonl": b""}
    for name, content in empties.items():
        (tmp_path / name).write_bytes(content)
    pq.write_table(pa.table({"path": pa.array([], pa.string())}), tmp_path / "empty.parquet")
    capsys.readouterr()
    for name in [*empties, "empty.parquet"]:
        assert run_score(trained, name, "-o", f"{name}.jsonl") == 1, name
        assert capsys.readouterr().err.strip().splitlines()[-1] == f"qmamba: error: the table {name} has no rows"
    assert run_score(trained, "a.png", "./a.png", str(tmp_path / "a.png"), "-o", "once.jsonl") == 0
    assert list(rows_of(tmp_path / "once.jsonl")) == ["a.png"]
    assert "2 repeated input path(s) are scored once" in capsys.readouterr().err


def test_a_name_a_shard_repeats_is_scored_once_from_its_first_member_and_said(trained, collection, tmp_path, capsys):
    import tarfile

    first, second = list(collection[1].values())[:2]
    shard = tmp_path / "000000.tar"
    with tarfile.open(shard, "w") as archive:
        archive.add(first, arcname="a.png")
        archive.add(second, arcname="a.png")  # once dropped without a word
    output = tmp_path / "scores.jsonl"
    assert run_score(trained, str(shard), "-o", str(output)) == 0
    assert "1 repeated input path(s) are scored once (the first of each" in capsys.readouterr().err
    rows = rows_of(output)
    assert list(rows) == [f"{shard}#a.png"]
    assert rows[f"{shard}#a.png"]["score"] == pytest.approx(file_scores(trained, {"a": first})["a"], rel=1e-6)


def test_a_missing_or_broken_shard_stops_before_scoring(trained, collection, tmp_path, capsys):
    shards, _ = collection
    (tmp_path / "broken.tar").write_bytes(b"not a tar file" * 100)
    for shard, message in ((shards / "000009.tar", f"shard {shards / '000009.tar'} does not exist"),
                           (tmp_path / "broken.tar", "cannot read the shard")):
        assert run_score(trained, str(shards / "000000.tar"), str(shard), "-o", str(tmp_path / "s.csv")) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert message in err[-1] and "Traceback" not in "\n".join(err)
        assert not (tmp_path / "s.csv").exists() and not (tmp_path / "s.csv.partial").exists()


@ray_cluster
@pytest.mark.parametrize("compress", ["gzip", "bz2", "xz"])
def test_a_compressed_shard_named_tar_is_one_line_from_either_engine(trained, collection, tmp_path, capsys, compress):
    """The local engine listed a gzip shard's decompressed members, then read them at those offsets from the
    compressed file: every image was reported corrupt."""
    import bz2
    import gzip
    import lzma

    shards, _ = collection
    packed = tmp_path / "packed.tar"
    packed.write_bytes({"gzip": gzip, "bz2": bz2, "xz": lzma}[compress].compress((shards / "000000.tar").read_bytes()))
    lines = []
    for engine, output in (("local", "s.csv"), ("ray", "parts/")):
        assert run_score(trained, str(packed), "--engine", engine, "-o", str(tmp_path / output), device=None) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"the shard {packed} is" in err[0] and "-compressed" in err[0], err
        lines.append(err[0])
    assert lines[0] == lines[1]
    assert not any(tmp_path.glob("s.csv*")) and not (tmp_path / "parts").exists()


def test_a_brace_pattern_of_too_many_names_is_one_line_before_it_is_expanded(trained, tmp_path, capsys, monkeypatch):
    """A typo of two digits made 100 million names, built as a list (3.2 GB in 6 s) before the first was tried."""
    from qmamba.inference import sources

    pattern = str(tmp_path / "shards" / "{00000000..99999999}.tar")
    assert run_score(trained, pattern, "-o", str(tmp_path / "s.csv")) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"the brace pattern {pattern} stands for more than 1,000,000 names" in err[0], err
    monkeypatch.setattr(sources, "MAX_PATTERN_NAMES", 3)
    assert sources._braces("{1..3}.png") == ["1.png", "2.png", "3.png"]
    for counted_or_not in ("{1..4}.png", "{a,b}{1,2}", "{1,{2,3,4}}"):  # a range, a product, nested (expanded lazily)
        with pytest.raises(sources.InputError, match="more than 3 names"):
            sources._braces(counted_or_not)


def test_shards_and_a_table_of_urls_in_a_bucket_score_as_the_local_files(trained, collection, tmp_path, bucket):
    client, env = bucket
    shards, files = collection
    for shard in sorted(shards.glob("*.tar")):
        client.upload_file(str(shard), "iqa", f"shards/{shard.name}")
    names = list(files)[:4]
    for name in names:
        client.upload_file(str(files[name]), "iqa", f"loose/{name}")
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = io.BytesIO()
    pq.write_table(pa.table({"url": [f"s3://iqa/loose/{n}" for n in names]}), table)
    client.put_object(Bucket="iqa", Key="tables/images.parquet", Body=table.getvalue())

    output = tmp_path / "scores.jsonl"
    assert run_score(trained, "s3://iqa/shards/{000000..000003}.tar", "s3://iqa/tables/images.parquet",
                  "-o", str(output)) == 1  # the corrupt member
    rows = rows_of(output)
    expected = file_scores(trained, files)
    for name, score in expected.items():
        shard = f"s3://iqa/shards/{name[:6]}.tar#{name}"
        assert rows[shard]["score"] == pytest.approx(score, rel=1e-6), name
    for name in names:
        assert rows[f"s3://iqa/loose/{name}"]["score"] == pytest.approx(expected[name], rel=1e-6)
    assert "error" in rows["s3://iqa/shards/000002.tar#corrupt.jpg"]

    no_credentials = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    no_credentials.update(AWS_ENDPOINT_URL=env["AWS_ENDPOINT_URL"], AWS_CONFIG_FILE=os.devnull,
                          AWS_SHARED_CREDENTIALS_FILE=os.devnull, AWS_EC2_METADATA_DISABLED="true")
    result = subprocess.run([sys.executable, "-m", "qmamba", "score", "--ckpt_path",
                             str(trained[1] / "checkpoints" / "best.ckpt"), "s3://iqa/shards/000000.tar",
                             "-o", str(tmp_path / "anon.csv"), "--device", "cpu"],
                            capture_output=True, text=True, timeout=300, env=no_credentials)
    err = result.stderr.strip().splitlines()
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert err[-1].startswith("qmamba: error: cannot open shard s3://iqa/shards/000000.tar: ")
    assert "credentials" in err[-1].lower()


def test_a_bucket_or_folder_output_holds_parquet_parts_and_resumes(trained, collection, bucket, tmp_path):
    client, _ = bucket
    shards, files = collection
    inputs = [str(shards / "{000000..000003}.tar")]
    expected = file_scores(trained, files)
    for output in ("s3://iqa/scores/", f"{tmp_path / 'scores'}/"):
        read = (lambda name: bucket_parts(client, "scores/", tmp_path / name)) if output.startswith("s3://") else (
            lambda name: parts_of(tmp_path / "scores"))
        assert run_score(trained, *inputs, "-o", output, "--part-rows", "4") == 1  # the corrupt member, the text
        rows = read("first")
        if not output.startswith("s3://"):  # --part-rows is honoured (parts of 24 rows were written for 20)
            sizes = [pq.read_metadata(p).num_rows for p in (tmp_path / "scores").glob("part-*.parquet")]
            assert max(sizes) == 4, sizes
        assert len(rows) == 14 and sum(r["error"] is not None for r in rows.values()) == 2
        for key, row in rows.items():
            if row["error"] is None:
                assert row["score"] == pytest.approx(expected[key.rsplit("#", 1)[1]], rel=1e-6), key
        assert run_score(trained, *inputs, "-o", output) == 1  # resumed: only the two failures tried again
        assert read("second").keys() == rows.keys()


@pytest.mark.parametrize("allowed", ["reading", "the probe only"])
def test_a_bucket_prefix_that_cannot_be_written_is_one_line(trained, collection, bucket, monkeypatch, capsys,
                                                            allowed):
    """moto's server enforcing IAM, with credentials that may read (one line before the model loads) or write only
    qmamba's probe object (a policy per prefix: the first part is refused, one line, not a traceback)."""
    import boto3
    import moto.settings

    client, env = bucket
    image = next(iter(collection[1].values()))
    client.upload_file(str(image), "iqa", "img/a.png")
    iam = boto3.client("iam", endpoint_url=env["AWS_ENDPOINT_URL"])
    iam.create_user(UserName="reader")
    statements = [{"Effect": "Allow", "Action": ["s3:GetObject", "s3:ListBucket"], "Resource": "*"}]
    if allowed == "the probe only":
        statements.append({"Effect": "Allow", "Action": ["s3:PutObject", "s3:DeleteObject"],
                           "Resource": "arn:aws:s3:::iqa/out/.qmamba-probe-*"})
    iam.put_user_policy(UserName="reader", PolicyName="policy",
                        PolicyDocument=json.dumps({"Version": "2012-10-17", "Statement": statements}))
    key = iam.create_access_key(UserName="reader")["AccessKey"]
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"])
    monkeypatch.setattr(moto.settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)  # from now on, the policy holds
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    if allowed == "reading":
        monkeypatch.setattr("qmamba.inference.scoring.load", lambda *a, **k: pytest.fail("the model was loaded"))
    assert run_score(trained, "s3://iqa/img/a.png", "-o", "s3://iqa/out/") == (2 if allowed == "reading" else 1)
    err = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(err) and "Access Denied" in err[-1], err
    if allowed == "reading":
        assert err[-1].startswith("qmamba: error: cannot write --output s3://iqa/out/: PermissionError: Access Denied")
    else:
        assert err[-1].startswith("qmamba: error: cannot write s3://iqa/out/part-") or "iqa/out/part-" in err[-1]


def test_a_folder_of_another_runs_parts_is_refused_before_any_work_and_left_as_it_was(trained, collection, tmp_path,
                                                                                    capsys):
    """Parts of another scoring (other crops here; another checkpoint or dataset alike), parts without qmamba's
    record (a 9.9 outside the 1-5 scale, say), files qmamba did not write, or scores of images that are not among
    the inputs: one line naming what is there, and nothing in the folder is touched."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    _, files = collection
    images = [str(p) for p in list(files.values())[:4]]
    output = tmp_path / "scores"
    assert run_score(trained, *images, "-o", f"{output}/") == 0
    capsys.readouterr()
    before = {p.name: p.read_bytes() for p in output.iterdir()}

    def refused(*args: str) -> str:
        assert run_score(trained, *args, "-o", f"{output}/") == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "Traceback" not in err[0], err
        assert {p.name: p.read_bytes() for p in output.iterdir()} == before, "the folder was touched"
        return err[0]

    assert "scored with crops 2 (this run: 3);" in refused(*images, "--crops", "3")
    assert "holds scores of 2 images that are not among this run's inputs" in refused(*images[2:])
    foreign = pa.table({"path": [images[0]], "score": [9.9], "flag": [""], "error": pa.array([None], pa.string())})
    pq.write_table(foreign, output / "part-foreign.parquet")
    before["part-foreign.parquet"] = (output / "part-foreign.parquet").read_bytes()
    assert "part-foreign.parquet, which has no record of what scored it" in refused(*images)
    (output / "part-foreign.parquet").unlink()
    (output / "notes.txt").write_text("mine")
    del before["part-foreign.parquet"]
    before["notes.txt"] = b"mine"
    assert "holds notes.txt, which qmamba score did not write" in refused(*images)
    (output / "notes.txt").unlink()
    del before["notes.txt"]
    # each part records the precision it was scored in, and a resume in another takes none of them over
    own = pq.read_table(next(output.glob("part-*.parquet")))
    record = json.loads(own.schema.metadata[b"qmamba"])
    assert record["precision"] == "fp32"
    pq.write_table(own.replace_schema_metadata({b"qmamba": json.dumps({**record, "precision": "bf16"})}),
                   output / "part-bf16.parquet")
    before["part-bf16.parquet"] = (output / "part-bf16.parquet").read_bytes()
    assert "part-bf16.parquet, scored with precision bf16 (this run: fp32)" in refused(*images)
    (output / "part-bf16.parquet").unlink()
    del before["part-bf16.parquet"]
    assert run_score(trained, *images, "-o", f"{output}/") == 0  # its own parts: a resume, nothing left to score
    assert "resuming" in capsys.readouterr().err and len(parts_of(output)) == 4


@pytest.mark.slow
def test_a_signal_to_a_folder_output_writes_what_arrived_and_a_rerun_finishes(trained, tmp_path, forked_qmamba):
    """SIGTERM: the rows that arrived are written as whole parts, the exit is 143, the output is not marked complete;
    the rerun scores the rest (both engines share this loop: qmamba.commands.score_parts)."""
    images = tmp_path / "many"
    images.mkdir()
    source = next((trained[0] / "kadid" / "images").glob("I01_01_01.png")).read_bytes()
    for i in range(300):
        (images / f"{i:03d}.png").write_bytes(source)
    output = tmp_path / "scores"
    process = forked_qmamba("score").popen(["score", "--ckpt_path", str(trained[1] / "checkpoints" / "best.ckpt"),
                                            str(images), "-o", f"{output}/", "--batch-size", "2", "--part-rows", "2",
                                            "--device", "cpu"], stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(list(output.glob("part-*.parquet"))) < 2:
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 143, err
    written = int(err.split("SIGTERM: ")[1].split(" scores written")[0])
    assert 4 <= written == len(parts_of(output)) < 300 and not (output / "_qmamba.json").exists()
    assert run_score(trained, str(images), "-o", f"{output}/") == 0
    assert len(parts_of(output)) == 300 and (output / "_qmamba.json").exists()
