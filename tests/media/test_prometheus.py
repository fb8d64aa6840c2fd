"""The media path's Prometheus numbers: live and ended calls summed at scrape time, bounded labels."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from bridge.media.metrics import MediaStats, depth_bucket
from bridge.media.prometheus import MediaMetrics


class _Inbound:
    def __init__(self, lost: int) -> None:
        self.lost_packets = lost


def _scrape(metrics: MediaMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    registry = CollectorRegistry()
    registry.register(metrics)
    out = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def _call(added_ms: list[float], late_cuts: int, drops: dict[str, int]) -> MediaStats:
    stats = MediaStats()
    for ms in added_ms:
        stats.added_latency_ms.add(ms)
        stats.send_lateness_ms.add(0.2)
        stats.socket_wait_ms.add(3.0)
    stats.rtp_out_late_dropped = late_cuts
    stats.rtp_out_expanded, stats.rtp_out_shrunk = 3, 2
    stats.rtp_dropped.update(drops)
    stats.jitter_depths[depth_bucket(1)] += 5
    stats.jitter_depths[depth_bucket(40)] += 1
    return stats


def test_live_and_ended_calls_are_summed_with_bounded_labels() -> None:
    metrics = MediaMetrics()
    ended = _call([4.0, 12.0], late_cuts=1, drops={"payload_type": 2, "socket_error:111": 1})
    live = _call([30.0], late_cuts=2, drops={"ssrc": 4})
    metrics.call_started(ended, _Inbound(lost=3))
    metrics.call_started(live, _Inbound(lost=1))
    metrics.call_ended(ended)
    metrics.browser_talk_started()
    got = _scrape(metrics)
    assert got[("aziza_media_calls_active", ())] == 1
    assert got[("aziza_media_calls_total", ())] == 2
    assert got[("aziza_browser_talks_active", ())] == 1 and got[("aziza_browser_talks_total", ())] == 1
    assert got[("aziza_media_output_late_cuts_total", ())] == 3
    assert got[("aziza_media_output_slots_inserted_total", ())] == 6
    assert got[("aziza_media_output_slots_won_back_total", ())] == 4
    assert got[("aziza_media_packets_lost_total", ())] == 4
    # Dropped datagrams by reason; reasons outside the known set are "other" (no unbounded labels).
    assert got[("aziza_media_rtp_dropped_total", (("reason", "payload_type"),))] == 2
    assert got[("aziza_media_rtp_dropped_total", (("reason", "ssrc"),))] == 4
    assert got[("aziza_media_rtp_dropped_total", (("reason", "other"),))] == 1
    # Added latency: 4 ms and 12 ms and 30 ms over three calls' frames.
    le = "aziza_media_added_latency_seconds_bucket"
    assert got[(le, (("le", "0.005"),))] == 1
    assert got[(le, (("le", "0.015"),))] == 2
    assert got[(le, (("le", "+Inf"),))] == 3
    assert abs(got[("aziza_media_added_latency_seconds_sum", ())] - 0.046) < 0.001
    assert got[("aziza_media_pacing_lateness_seconds_bucket", (("le", "0.00025"),))] == 3
    wait = "aziza_media_socket_wait_seconds_bucket"
    assert got[(wait, (("le", "0.002"),))] == 0 and got[(wait, (("le", "0.005"),))] == 3
    depth = "aziza_media_jitter_buffer_depth_packets_bucket"
    assert got[(depth, (("le", "1"),))] == 10 and got[(depth, (("le", "+Inf"),))] == 12
    labels = {name for (name, lbl) in got for name, _ in lbl}
    assert labels <= {"reason", "le"}  # no per-call labels
    metrics.call_ended(live)
    metrics.browser_talk_ended()
    after = _scrape(metrics)
    assert after[("aziza_media_calls_active", ())] == 0
    assert after[("aziza_media_output_late_cuts_total", ())] == 3  # ended calls still count
    assert after[("aziza_browser_talks_active", ())] == 0
