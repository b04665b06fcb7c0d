"""Ratios, targets and the Markdown tables from one run's result dict (plot: :mod:`bench.plot`)."""

from __future__ import annotations

import logging
import math
from typing import Any

logger = logging.getLogger(__name__)

FASTAPI_CONCURRENCY = 32


def _cells(result: dict[str, Any], system: str, endpoint: str) -> list[dict[str, Any]]:
    entry = result.get("systems", {}).get(system, {})
    if entry.get("status") != "ok":
        return []
    return entry.get("endpoints", {}).get(endpoint, {}).get("cells", [])


def _at(cells: list[dict[str, Any]], concurrency: int) -> dict[str, Any] | None:
    return next((c for c in cells if c["concurrency"] == concurrency), None)


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def _per_level(ours: list[dict[str, Any]], theirs: list[dict[str, Any]]
               ) -> tuple[dict[int, float | None], float | None, int | None]:
    """Ours / theirs images/s at every concurrency both measured; the smallest and its level."""
    per_level = {}
    for cell in theirs:
        mine = _at(ours, cell["concurrency"])
        if mine is not None:
            per_level[cell["concurrency"]] = _ratio(mine["images_per_s"], cell["images_per_s"])
    valid = {c: r for c, r in per_level.items() if r is not None}
    worst = min(valid, key=valid.get) if valid else None
    return per_level, (valid[worst] if valid else None), worst


def _peer_target(ratios: dict, at: dict, targets: dict, key: str, ours: list[dict[str, Any]],
                 theirs: list[dict[str, Any]], against: str) -> None:
    """``key`` = the smallest ours/theirs ratio over the levels, target >= 1.0 at every level."""
    per_level, worst_ratio, worst = _per_level(ours, theirs)
    ratios[key], at[key] = worst_ratio, worst
    valid = [r for r in per_level.values() if r is not None]
    targets[key] = {"target": ">= 1.0 at every concurrency", "against": against,
                    "per_concurrency": per_level, "value": worst_ratio,
                    "met": None if not valid else all(r >= 1.0 for r in valid)}


BATCH_JOB_TARGET = 0.9
LIMIT_TARGET = 0.85
C1_LATENCY_TARGET = 1.5


def _probes(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Our system's limit probes (``systems.cnn_codes.limit_beside``); empty without them."""
    return result.get("systems", {}).get("cnn_codes", {}).get("limit_beside") or []


def beside_limits(result: dict[str, Any]) -> dict[int, dict[str, float]]:
    """``{concurrency: {"shared_cores_images_per_s", "c1_alone_ms"}}``: for each level of our
    cells, the mean of the limit probe before it and the one after it
    (``systems.cnn_codes.limit_beside``, :func:`bench.limit.probe`); a level whose probes
    failed, or a run without probes, is absent."""
    probes = _probes(result)
    levels = result.get("plan", {}).get("concurrency", [])
    beside: dict[int, dict[str, float]] = {}
    for index, concurrency in enumerate(levels):
        pair = probes[index:index + 2]
        if len(pair) == 2 and all(p.get("status") == "ok" for p in pair):
            beside[concurrency] = {
                key: round((pair[0][key] + pair[1][key]) / 2, 2)
                for key in ("shared_cores_images_per_s", "c1_alone_ms")}
    return beside


def _left_by_client(limit: float | None, client_cores: float | None,
                    cores: int | None) -> float | None:
    """``limit`` images/s scaled to the cores the load generator left: ``limit x (cores -
    client_cores) / cores``; None when any is unknown (cells of runs before 2026-12-02
    06:38 UTC carry no ``client_cores``)."""
    if limit is None or client_cores is None or not cores:
        return None
    return limit * max(cores - client_cores, 0.0) / cores


def compute_ratios(result: dict[str, Any]) -> tuple[dict, dict, dict]:
    """The ``ratios`` object, the concurrency beside each, and the targets verdicts.

    * ``service_vs_limit_shared_cores`` / ``service_grpc_vs_limit_shared_cores`` (the targets,
      >= 0.85 with no failed response): our HTTP ``/embed`` / gRPC ``ModelInfer`` images/s
      at each concurrency level over the shared-cores pipeline limit (both stages on the
      same cores, ``bench.limit.pipeline_limit``) measured beside that level
      (:func:`beside_limits`), the best level's ratio; ``vs_start_of_run_limit`` in the
      verdict is the best level over the limit measured once at the start (what runs
      before the probes reported);
      ``<key>_left_by_client`` (context): each level against the part of that limit the load
      generator left, ``limit x (cores - client cores) / cores`` (the client's cores inside
      the window, ``bench.loadgen.window_client_cores``: it shares the cores with the server,
      while the limit is measured with nothing else running), the best level's ratio;
      ``service_vs_limit`` (context): the same HTTP figure over the smaller of
      onnxruntime-alone and decode-alone, each given all the cores.
    * ``service_vs_fastapi_torch``: ours / FastAPI + torch eager on ``/embed`` at c=32.
    * ``service_vs_torchserve``: ours ``/classify`` / TorchServe's stock classifier, the
      smallest ratio over the concurrency levels both measured (the target is "every level").
    * ``service_vs_triton``: ours HTTP ``/embed`` / Triton's KServe v2 HTTP infer (its gRPC
      when HTTP was not measured), smallest over the levels; ``service_grpc_vs_triton``: our
      gRPC ``ModelInfer`` / Triton's, the same way.
    * ``service_vs_ray_serve``: ours HTTP ``/embed`` / Ray Serve's, smallest over the levels.
    * ``c1_latency_vs_alone``: our c=1 ``/embed`` p50 over decode + onnxruntime batch 1,
      each alone, measured beside the c=1 cells (the start-of-run figure in the verdict).
    * ``batch_job_vs_limit_shared_cores``: ``cnn-codes embed`` (local engine, start-up
      excluded) / the shared-cores pipeline limit measured before and after the job (the
      start-of-run limit when the job was not probed; that ratio is in its target as
      ``vs_start_of_run_limit``); ``batch_job_ray_2_vs_1_actors``: how the
      Ray engine scales from 1 to 2 actors (context).
    """
    ours_embed = _cells(result, "cnn_codes", "embed")
    ours_classify = _cells(result, "cnn_codes", "classify")
    limit = result.get("limit", {}).get("pipeline", {})
    ratios: dict[str, float | None] = {}
    at: dict[str, Any] = {}
    targets: dict[str, Any] = {}

    best = max(ours_embed, key=lambda c: c["images_per_s"]) if ours_embed else None
    ratios["service_vs_limit"] = _ratio(best and best["images_per_s"],
                                        limit.get("images_per_s"))
    at["service_vs_limit"] = best and best["concurrency"]
    shared = limit.get("shared_cores_images_per_s")
    beside = beside_limits(result)
    ours_grpc = _cells(result, "cnn_codes", "grpc_embed")
    cores = (result.get("machine") or {}).get("cores")
    for key, cells, what in (
            ("service_vs_limit_shared_cores", ours_embed, "HTTP /embed"),
            ("service_grpc_vs_limit_shared_cores", ours_grpc, "gRPC ModelInfer")):
        top = max(cells, key=lambda c: c["images_per_s"]) if cells else None
        at_start = _ratio(top and top["images_per_s"], shared)
        limit_at = {c["concurrency"]: beside.get(c["concurrency"], {}).get(
            "shared_cores_images_per_s") for c in cells}
        per_level = {c["concurrency"]: _ratio(c["images_per_s"], limit_at[c["concurrency"]])
                     for c in cells}
        left = {c["concurrency"]: _ratio(c["images_per_s"], _left_by_client(
            limit_at[c["concurrency"]], c.get("client_cores"), cores)) for c in cells}
        left_valid = [r for r in left.values() if r is not None]
        ratios[f"{key}_left_by_client"] = max(left_valid) if left_valid else None
        valid = {c: r for c, r in per_level.items() if r is not None}
        if valid:  # each level against the limit measured beside it
            level = max(valid, key=valid.get)
            value, against = valid[level], f"{what}, limit measured beside each level"
        else:  # runs without probes (before 2026-12-01 21:00 UTC): the start-of-run limit
            level, value, against = top and top["concurrency"], at_start, \
                f"{what}, limit measured at the start of the run"
        ratios[key], at[key] = value, level
        failed = sum(c.get("errors", 0) for c in cells)
        targets[key] = {
            "target": f">= {LIMIT_TARGET} with 0 failed responses", "against": against,
            "value": value, "failed_responses": failed, "per_concurrency": per_level,
            "vs_start_of_run_limit": at_start, "left_by_client_per_concurrency": left,
            "client_cores_per_concurrency": {c["concurrency"]: c.get("client_cores")
                                             for c in cells},
            "met": None if value is None else bool(value >= LIMIT_TARGET and not failed)}

    ours32 = _at(ours_embed, FASTAPI_CONCURRENCY)
    theirs32 = _at(_cells(result, "fastapi_torch", "embed"), FASTAPI_CONCURRENCY)
    ratios["service_vs_fastapi_torch"] = _ratio(ours32 and ours32["images_per_s"],
                                                theirs32 and theirs32["images_per_s"])
    at["service_vs_fastapi_torch"] = FASTAPI_CONCURRENCY
    p99 = (ours32["latency_ms"]["p99"], theirs32["latency_ms"]["p99"]) if ours32 and theirs32 \
        else (None, None)
    value = ratios["service_vs_fastapi_torch"]
    targets["service_vs_fastapi_torch"] = {
        "target": ">= 3.0 at c=32 with lower p99", "value": value,
        "p99_ms_ours": p99[0], "p99_ms_theirs": p99[1],
        "met": None if value is None else bool(value >= 3.0 and p99[0] < p99[1])}

    for key in ("torchserve", "torchserve_tuned"):
        ratio_key = f"service_vs_{key}"
        per_level, ratios[ratio_key], at[ratio_key] = _per_level(
            ours_classify, _cells(result, key, "classify"))
        valid = {c: r for c, r in per_level.items() if r is not None}
        targets[ratio_key] = {
            "target": "> 1.0 at every concurrency" + ("" if key == "torchserve" else
                                                       " (context: tuned TorchServe)"),
            "per_concurrency": per_level, "value": ratios[ratio_key],
            "met": None if not valid else all(r > 1.0 for r in valid.values())}

    triton_http, triton_grpc = (_cells(result, "triton", "v2_embed"),
                                _cells(result, "triton", "grpc_embed"))
    _peer_target(ratios, at, targets, "service_vs_triton", ours_embed,
                 triton_http or triton_grpc, "ours HTTP /embed vs Triton "
                 + ("gRPC" if triton_grpc and not triton_http else "KServe v2 HTTP"))
    _peer_target(ratios, at, targets, "service_grpc_vs_triton",
                 _cells(result, "cnn_codes", "grpc_embed"), triton_grpc,
                 "ours gRPC ModelInfer vs Triton gRPC ModelInfer")
    _peer_target(ratios, at, targets, "service_vs_ray_serve", ours_embed,
                 _cells(result, "ray_serve", "embed"), "ours HTTP /embed vs Ray Serve HTTP")

    # c=1 latency: our /embed p50 vs decode (mean, one core) + onnxruntime batch 1 (p50), alone
    alone = result.get("limit", {})
    batch1 = next((r for r in alone.get("onnxruntime", []) if r["batch"] == 1), None)
    decode_ms = (alone.get("decode") or {}).get("ms_per_image_mean")
    ours1 = _at(ours_embed, 1)
    start_ms = (batch1["ms_per_batch_p50"] + decode_ms) if batch1 and decode_ms else None
    alone_ms = beside.get(1, {}).get("c1_alone_ms") or start_ms
    value = _ratio(ours1 and ours1["latency_ms"]["p50"], alone_ms)
    ratios["c1_latency_vs_alone"], at["c1_latency_vs_alone"] = value, 1
    targets["c1_latency_vs_alone"] = {
        "target": f"<= {C1_LATENCY_TARGET} x (decode + onnxruntime batch 1, alone)",
        "against": "measured beside the c=1 cells" if 1 in beside
        else "measured at the start of the run",
        "value": value, "alone_ms": alone_ms and round(alone_ms, 2),
        "ours_p50_ms": ours1 and ours1["latency_ms"]["p50"],
        "vs_start_of_run_limit": _ratio(ours1 and ours1["latency_ms"]["p50"], start_ms),
        "met": None if value is None else value <= C1_LATENCY_TARGET}

    jobs = (result.get("batch_job") or {}).get("configs", {})
    local = jobs.get("local", {}).get("images_per_s")
    local_beside = jobs.get("local", {}).get("limit_beside_images_per_s")
    start_value = _ratio(local, limit.get("shared_cores_images_per_s"))
    value = _ratio(local, local_beside) if local_beside else start_value
    ratios["batch_job_vs_limit_shared_cores"] = value
    at["batch_job_vs_limit_shared_cores"] = None
    targets["batch_job_vs_limit_shared_cores"] = {
        "target": f">= {BATCH_JOB_TARGET} (start-up excluded)", "value": value,
        "against": "measured before and after the job" if local_beside
        else "measured at the start of the run",
        "limit_images_per_s": local_beside or limit.get("shared_cores_images_per_s"),
        "vs_start_of_run_limit": start_value if local_beside else None,
        "met": None if value is None else value >= BATCH_JOB_TARGET}
    ratios["batch_job_ray_2_vs_1_actors"] = _ratio(
        jobs.get("ray_2_actors", {}).get("images_per_s"),
        jobs.get("ray_1_actor", {}).get("images_per_s"))
    return ratios, at, targets


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def summary_table(result: dict[str, Any]) -> list[str]:
    """Images/s (p99 ms) per concurrency, one column per system/endpoint (Markdown rows)."""
    columns = []
    for key, entry in result["systems"].items():
        if entry.get("status") != "ok":
            continue
        for endpoint, data in entry["endpoints"].items():
            if data.get("status", "ok") == "ok" and data.get("cells"):
                columns.append((f"{entry['title']} /{endpoint}", data["cells"]))
    if not columns:
        return []
    lines = ["| concurrency | " + " | ".join(t for t, _ in columns) + " |",
             "|---|" + "---|" * len(columns)]
    for concurrency in result["plan"]["concurrency"]:
        row = []
        for _, cells in columns:
            cell = _at(cells, concurrency)
            row.append("n/a" if cell is None else
                       f"{_fmt(cell['images_per_s'])} ({_fmt(cell['latency_ms']['p99'], 0)})"
                       + (f", {cell['errors']} err" if cell["errors"] else ""))
        lines.append(f"| {concurrency} | " + " | ".join(row) + " |")
    return lines


def batch_job_table(result: dict[str, Any]) -> list[str]:
    """The batch-job rows (``cnn-codes embed`` per engine, start-up excluded), Markdown."""
    job = result.get("batch_job") or {}
    if job.get("status") == "skipped":
        return ["", f"Batch job: skipped ({job.get('reason')})."]
    if not job.get("configs"):
        return []
    shared = (result.get("limit", {}).get("pipeline") or {}).get("shared_cores_images_per_s")
    small, large = job["sizes"]
    lines = ["", f"## Batch job: `cnn-codes embed` over {large} inputs (a manifest repeating the "
                 f"sample photos), start-up excluded", "",
             f"images/s = ({large} - {small}) images / (job seconds at {large} - at {small}); "
             f"parts of {job['shard_size']} images. Shared-cores limit at the start of the "
             f"run: {_fmt(shared)} images/s; beside each engine: the mean of the probes "
             "before and after it.",
             "", "| engine | images/s | vs shared-cores limit beside it (limit) | "
                 f"vs start-of-run limit | start-up s | s for {large} | images/s incl. "
                 "start-up | errors |",
             "|---|---|---|---|---|---|---|---|"]
    for label, row in job["configs"].items():
        if row.get("status") != "ok":
            lines.append(f"| {label} | not measured: {(row.get('reason') or '')[:300]} "
                         "| | | | | | |")
            continue
        big = row["runs"]["large"]
        beside = row.get("limit_beside_images_per_s")
        lines.append(f"| {label} | {_fmt(row['images_per_s'])} | "
                     + (f"{_fmt(_ratio(row['images_per_s'], beside), 3)} ({_fmt(beside)})"
                        if beside else "n/a") + " | "
                     f"{_fmt(_ratio(row['images_per_s'], shared), 3)} | "
                     f"{_fmt(row['startup_s'], 2)} | {_fmt(big['job_seconds'], 2)} | "
                     f"{_fmt(big['images_per_s_incl_startup'])} | {row['errors']} |")
    return lines


def beside_table(result: dict[str, Any]) -> list[str]:
    """The limit probes taken beside our cells (:func:`bench.limit.probe`), Markdown."""
    probes = _probes(result)
    if not probes:
        return []
    levels = result["plan"]["concurrency"]
    lines = ["", "## The limit again, beside our cells (server up and idle)", "",
             "Each level's cells are set against the mean of the probe before and the probe "
             "after them.", "",
             "| probe | at (UTC) | onnxruntime batch 1 ms | onnxruntime best batch images/s | "
             "decode ms (1 core) | decode images/s (all cores) | shared-cores limit | "
             "c=1 alone ms |", "|---|---|---|---|---|---|---|---|"]
    for index, row in enumerate(probes):
        where = "before c=" + str(levels[0]) if index == 0 else f"after c={levels[index - 1]}"
        if row.get("status") != "ok":
            lines.append(f"| {where} | failed: {(row.get('reason') or '')[:200]} "
                         "| | | | | | |")
            continue
        one, best = row["onnxruntime"][0], row["onnxruntime"][-1]
        dec = row["decode"]
        lines.append(f"| {where} | {row['at'][11:19]} | {one['ms_per_batch_p50']} | "
                     f"{_fmt(best['images_per_s'])} (batch {best['batch']}) | "
                     f"{dec['ms_per_image_mean']} | {_fmt(dec['all_cores_images_per_s'])} | "
                     f"{_fmt(row['shared_cores_images_per_s'])} | {row['c1_alone_ms']} |")
    return lines


def together_table(result: dict[str, Any]) -> list[str]:
    """The systems measured side by side (``measured_with``, :func:`bench.systems.
    measure_together`): each cell's passes, in the order they ran, how far apart they were,
    and the most CPU the idle systems used meanwhile; empty when every system ran alone."""
    together = [(key, e) for key, e in result.get("systems", {}).items()
                if e.get("status") == "ok" and e.get("measured_with")]
    if not together:
        return []
    titles = ", ".join(e["title"] for _, e in together)
    lines = ["", f"## Measured side by side: {titles}", "",
             "All up at once; at each level every (system, endpoint) cell ran several passes "
             "in mirrored rounds (A B ... B A, A B ... B A, ...), each pass an equal share of "
             "the window after its own warm-up; a cell above pools its passes, so a drift of "
             "the machine within the level moves every system's cells alike. Spread: the "
             "fastest pass over the slowest, what this machine alone moves one cell by.", "",
             "| system | endpoint | concurrency | passes, images/s (in the order they ran) | "
             "spread | idle systems' CPU, cores (max) |", "|---|---|---|---|---|---|"]
    for key, entry in together:
        for endpoint, data in entry["endpoints"].items():
            for c in data.get("cells", []):
                rates = [p["images_per_s"] for p in c.get("passes") or []]
                if len(rates) < 2:
                    continue
                spread = _fmt(max(rates) / min(rates), 2) if min(rates) > 0 else "n/a"
                lines.append(f"| {entry['title']} | {endpoint} | {c['concurrency']} | "
                             f"{' / '.join(_fmt(r) for r in rates)} | {spread} | "
                             f"{_fmt(c.get('others_cpu_cores'), 3)} |")
    return lines


def markdown(result: dict[str, Any]) -> str:
    """The results as Markdown tables (what ``bench/results/latest.md`` holds)."""
    m = result["machine"]
    lines = [
        f"# cnn-codes benchmark ({result['mode']} run, {result['finished_at']})",
        "",
        f"Machine: {m['cores']} cores, {m['cpu_model']}, "
        f"{_fmt((m['memory_bytes'] or 0) / 2**30)} GiB, no GPU. Load average (1/5/15 min) "
        f"{result['load_average_start']} at start, {result['load_average_end']} at end. "
        f"Model: `{result['model']['backbone']}` ({result['model']['ref']}), "
        f"{result['photos']['count']} sample photos, one photo per request, "
        f"{result['plan']['warmup_s']} s warm-up + {result['plan']['duration_s']} s per cell.",
        "",
        f"Command: `{result['command']}`",
        "",
        "## Ratios and targets",
        "",
        "| ratio | value | at concurrency | target | met |",
        "|---|---|---|---|---|",
    ]
    for key, verdict in result["targets"].items():
        met = {True: "yes", False: "**no**", None: "not measured"}[verdict["met"]]
        target = verdict["target"] + (f" ({verdict['against']})" if verdict.get("against")
                                      else "")
        lines.append(f"| `{key}` | {_fmt(result['ratios'].get(key), 3)} | "
                     f"{_fmt(result['ratios_at_concurrency'].get(key))} | {target} | "
                     f"{met} |")
    for key, verdict in result["targets"].items() if beside_limits(result) else ():
        if verdict.get("vs_start_of_run_limit") is not None:
            lines.append(f"| `{key}` | {_fmt(verdict['vs_start_of_run_limit'], 3)} | | "
                         "(context: against the limit measured once, at the start) | |")
    for key in ("service_vs_limit_shared_cores", "service_grpc_vs_limit_shared_cores"):
        value = result["ratios"].get(f"{key}_left_by_client")
        if value is not None:
            cores = result["targets"][key].get("client_cores_per_concurrency", {})
            shown = ", ".join(f"c={c}: {_fmt(v, 2)}" for c, v in cores.items() if v is not None)
            lines.append(f"| `{key}_left_by_client` | {_fmt(value, 3)} | | (context: against "
                         "the part of the limit beside each level that the load generator "
                         f"left; its cores {shown}) | |")
    lines.append(f"| `service_vs_limit` | "
                 f"{_fmt(result['ratios'].get('service_vs_limit'), 3)} | "
                 f"{_fmt(result['ratios_at_concurrency'].get('service_vs_limit'))}"
                 " | (context: each stage alone on all cores) | |")
    if "batch_job_ray_2_vs_1_actors" in result["ratios"]:
        lines.append(f"| `batch_job_ray_2_vs_1_actors` | "
                     f"{_fmt(result['ratios']['batch_job_ray_2_vs_1_actors'], 3)} | | "
                     "(context: Ray engine, 2 actors / 1) | |")
    limit = result.get("limit", {})
    if limit:
        lines += ["", "## The limit (same cores, nothing else of ours running)", "",
                  "| stage | images/s |", "|---|---|"]
        for row in limit["onnxruntime"]:
            lines.append(f"| onnxruntime, batch {row['batch']} "
                         f"({row['ms_per_batch_p50']} ms/batch) | {_fmt(row['images_per_s'])} |")
        # runs before 2026-11-21 17:30 UTC stored this row as "onnxruntime_no_spinning"
        for row in limit.get("onnxruntime_other_spinning",
                             limit.get("onnxruntime_no_spinning", [])):
            spinning = "on" if row.get("allow_spinning") else "off"
            lines.append(f"| (context) onnxruntime, batch {row['batch']}, intra-op spinning "
                         f"{spinning} ({row['ms_per_batch_p50']} ms/batch) | "
                         f"{_fmt(row['images_per_s'])} |")
        dec = limit["decode"]
        pipe = limit["pipeline"]
        lines += [
            f"| decode + preprocess, 1 core ({dec['ms_per_image_mean']} ms/image) | "
            f"{_fmt(dec['per_core_images_per_s'])} |",
            f"| decode + preprocess, {dec['processes']} processes | "
            f"{_fmt(dec['all_cores_images_per_s'])} |",
            f"| **pipeline limit** = min(onnxruntime best, decode all cores), bound by "
            f"{pipe['bound_by']} | **{_fmt(pipe['images_per_s'])}** |",
            f"| both stages sharing the cores: 1/(1/onnx + 1/decode) | "
            f"{_fmt(pipe['shared_cores_images_per_s'])} |",
        ]
        job = limit.get("batch_job")
        if job:
            lines.append(f"| (context) `cnn-codes embed` batch job, local engine, {job['images']} "
                         f"photos in {job['seconds']} s incl. start-up | "
                         f"{_fmt(job['images_per_s'])} |")
    lines += beside_table(result)
    lines += batch_job_table(result)
    summary = summary_table(result)
    if summary:
        lines += ["", "## Throughput: images/s (p99 ms), one photo per request", "", *summary]
    lines += ["", "## Services over loopback HTTP and gRPC (every cell)", "",
              "| system | endpoint | concurrency | images/s | p50 ms | p95 ms | p99 ms | "
              "errors / responses | mean batch | client CPU s |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for key, entry in result["systems"].items():
        if entry.get("status") != "ok":
            lines.append(f"| {entry.get('title', key)} | | | not measured: "
                         f"{entry.get('reason', '')[:300]} | | | | | | |")
            continue
        for endpoint, data in entry["endpoints"].items():
            if data.get("status", "ok") != "ok":
                lines.append(f"| {entry['title']} | {endpoint} | | not measured: "
                             f"{(data.get('reason') or '')[:300]} | | | | | | |")
                continue
            for c in data["cells"]:
                lat = c["latency_ms"]
                errors = str(c["errors"])
                if c.get("rejected_overload"):
                    errors += f" ({c['rejected_overload']} overload)"
                lines.append(
                    f"| {entry['title']} | {endpoint} | {c['concurrency']} | "
                    f"{_fmt(c['images_per_s'])} | {_fmt(lat['p50'])} | {_fmt(lat['p95'])} | "
                    f"{_fmt(lat['p99'])} | {errors} / {c['completed']} | "
                    f"{_fmt(c.get('mean_batch_size'), 2)} | {_fmt(c['client_cpu_s'])} |")
    lines += together_table(result)
    bursts = [(e["title"], e["after_burst"]) for e in result["systems"].values()
              if e.get("after_burst")]
    if bursts:
        lines += ["", "## A lone client right after the heaviest cell", "",
                  "| system | endpoint | after | images/s | p50 ms | p99 ms | vs first c=1 p50 |",
                  "|---|---|---|---|---|---|---|"]
        for title, cell in bursts:
            key = next(k for k, e in result["systems"].items() if e.get("title") == title)
            first = _at(_cells(result, key, cell["endpoint"]), 1)
            ratio = (cell["latency_ms"]["p50"] / first["latency_ms"]["p50"]
                     if first and first["latency_ms"]["p50"] and cell["ok"] else None)
            lines.append(f"| {title} | {cell['endpoint']} | {cell['after']} | "
                         f"{_fmt(cell['images_per_s'])} | {_fmt(cell['latency_ms']['p50'])} | "
                         f"{_fmt(cell['latency_ms']['p99'])} | "
                         f"{'n/a' if ratio is None else f'{ratio:.2f}x'} |")
    lines += ["", "## Memory (process tree, MiB)", "",
              "| system | idle peak RSS | idle peak PSS | load peak RSS | load peak PSS | "
              "processes |", "|---|---|---|---|---|---|"]
    for key, entry in result["systems"].items():
        memory = entry.get("memory")
        if not memory:
            continue
        idle, load = memory.get("idle", {}), memory.get("load", {})
        lines.append(f"| {entry['title']} | {_fmt(idle.get('peak_rss_mib'))} | "
                     f"{_fmt(idle.get('peak_pss_mib'))} | {_fmt(load.get('peak_rss_mib'))} | "
                     f"{_fmt(load.get('peak_pss_mib'))} | {load.get('processes', 'n/a')} |")
    pre = result.get("preprocessing")
    if pre:
        lines += ["", "## Preprocessing: Pillow JPEG draft mode (1 core)", "",
                  "| photos | count | mean MP | ms draft off | ms draft on | speedup | "
                  "mean abs pixel diff |", "|---|---|---|---|---|---|---|"]
        for row in pre:
            lines.append(f"| {row['group']} | {row['count']} | {row['mean_megapixels']} | "
                         f"{row['ms_draft_off']} | {row['ms_draft_on']} | {row['speedup']}x | "
                         f"{row['mean_abs_pixel_diff']} |")
    for key, entry in result["systems"].items():
        prof = entry.get("profile")
        if not prof or prof.get("status") != "ok":
            continue
        lines += ["", f"## Profile: {entry['title']}, /{prof['endpoint']} at "
                      f"c={prof['concurrency']}, {prof['seconds']} s (py-spy, busy samples)", ""]
        for process, data in prof["processes"].items():
            if data["samples"] < 20:
                continue
            cats = ", ".join(f"{c} {p}%" for c, p in data.get("categories_pct", []))
            top = ", ".join(f"{f} {p}%" for f, p in data["inclusive_pct"][:6])
            self_top = ", ".join(f"{f} {p}%" for f, p in data["self_pct"][:5])
            lines.append(f"- **{process}** ({data['samples']} samples). By activity: {cats}. "
                         f"Hottest (inclusive): {top}. Self: {self_top}.")
    grpc = result.get("grpc") or {}
    lines += ["", f"gRPC: {grpc.get('status')}"
              + (f", best {grpc['images_per_s']} images/s at c={grpc['best_concurrency']}"
                 if grpc.get("images_per_s") is not None else "")
              + (f" ({grpc['reason']})" if grpc.get("reason") else "")]
    return "\n".join(lines) + "\n"
