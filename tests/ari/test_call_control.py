"""Call control against the fake Asterisk over real HTTP/WebSocket, with stand-in engine and media
(a real UDP echo endpoint). The real engine/CallMedia/PostgreSQL/Redis run in test_e2e.py."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest
from click.testing import CliRunner

from admin_cli.main import cli
from bridge.call_deps import CallRoute
from tests.ari.fake_asterisk import FakeBridge
from tests.ari.harness import control_headers, control_token_file, eventually, fake_and_bridge
from tests.ari.standins import StandinDeps, standin_deps

DID = "+15550001234"


async def _active_call(fake: Any, sd: StandinDeps, did: str = DID) -> str:
    caller = await fake.originate_call(did)
    await eventually(lambda: caller in sd.sink.answered_calls, what="call answered")
    return str(caller)


async def _post(url: str, body: dict[str, Any] | None = None) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as http, http.post(
        url, json=body or {}, headers=control_headers()
    ) as resp:
        return resp.status, await resp.json()


async def test_call_is_answered_bridged_and_media_flows_then_caller_hangs_up() -> None:
    sd = standin_deps()
    async with fake_and_bridge(sd.deps()) as (fake, svc):
        caller = await _active_call(fake, sd)
        assert fake.channel(caller).answered
        leg = fake.leg_for(caller)
        assert leg is not None
        await eventually(lambda: leg.packets_received > 5, what="RTP echoed back to the leg")
        call = svc.controller.get(caller)
        assert fake.bridges[call.bridge_id].channels == [caller, call.media_channel_id]
        # externalMedia asked exactly as ARCHITECTURE.md says, pointing at the call's own socket
        em = next(r for r in fake.requests if r.route == "/channels/externalMedia")
        assert em.query["format"] == "ulaw" and em.query["encapsulation"] == "rtp"
        assert em.query["transport"] == "udp"
        media_sock = sd.medias[0].sock
        assert media_sock is not None
        assert em.query["external_host"] == f"127.0.0.1:{media_sock.getsockname()[1]}"
        # the media leg's StasisStart was not taken for a call
        assert list(svc.controller.calls) == [caller]
        await fake.hangup_caller(caller)
        await eventually(lambda: caller in sd.sink.ended_calls, what="call record written")
        assert sd.sink.ended_calls[caller][0] == "caller_hangup"
        assert not fake.bridges and call.media_channel_id not in fake.channels
        timeline = sd.sink.ended_calls[caller][1]["timeline_ms"]
        assert timeline["torn_down"] - timeline["end_requested"] < 3000  # the bound, not a benchmark
        assert sd.capacity.released == [caller]
        assert sd.medias[0].sock is None and sd.engines[0].closed
        assert svc.controller.calls == {}
        # the caller channel was already gone: no DELETE for it
        assert not [r for r in fake.requests if r.method == "DELETE" and r.path.endswith(caller)]


async def test_eleventh_call_refused_busy_before_answer() -> None:
    sd = standin_deps(slots=10)
    async with fake_and_bridge(sd.deps()) as (fake, svc):
        callers = [await fake.originate_call(DID, caller=f"+1555000{i:04d}") for i in range(11)]
        await eventually(lambda: len(sd.sink.answered_calls) + len(sd.sink.refused_calls) == 11,
                         what="11 calls decided")
        assert len(sd.sink.refused_calls) == 1
        info, reason = sd.sink.refused_calls[0]
        assert reason == "capacity_full"
        refused = fake.channel(info.call_id)
        assert refused.hangup_reason == "busy" and not refused.answered
        assert not [r for r in fake.requests if r.route == "/channels/{channelId}/answer"
                    and r.path.endswith(info.call_id)]
        assert len(svc.controller.calls) == 10
        # a slot frees: the next caller gets in
        await fake.hangup_caller(next(c for c in callers if c != info.call_id))
        await eventually(lambda: len(svc.controller.calls) == 9, what="slot freed")
        late = await fake.originate_call(DID)
        await eventually(lambda: late in sd.sink.answered_calls, what="12th call answered")


async def test_refuse_reason_congestion_is_configurable() -> None:
    sd = standin_deps(slots=1)
    overrides = {"ari": {"refuse_reason": "congestion"}}
    async with fake_and_bridge(sd.deps(), settings_overrides=overrides) as (fake, _):
        await _active_call(fake, sd)
        second = await fake.originate_call(DID)
        await eventually(lambda: sd.sink.refused_calls, what="refusal")
        await eventually(lambda: fake.channel(second).hangup_reason, what="hung up")  # lands after the record
        assert fake.channel(second).hangup_reason == "congestion"


async def test_engine_down_refuses_with_congestion_before_answer() -> None:
    sd = standin_deps()
    sd.engine_down = True
    async with fake_and_bridge(sd.deps()) as (fake, svc):
        caller = await fake.originate_call(DID)
        await eventually(lambda: sd.sink.refused_calls, what="refusal")
        assert sd.sink.refused_calls[0][1] == "engine_unavailable"
        await eventually(lambda: fake.channel(caller).hangup_reason, what="hung up")  # lands after the record
        assert fake.channel(caller).hangup_reason == "congestion" and not fake.channel(caller).answered
        await eventually(lambda: sd.capacity.released == [caller], what="lease released")
        assert svc.controller.calls == {}


async def test_media_that_cannot_be_set_up_refuses_with_congestion_before_answer() -> None:
    sd = standin_deps()
    sd.media_down = True
    async with fake_and_bridge(sd.deps()) as (fake, svc):
        caller = await fake.originate_call(DID)
        await eventually(lambda: sd.sink.refused_calls, what="refusal")
        assert sd.sink.refused_calls[0][1] == "media_unavailable"
        await eventually(lambda: fake.channel(caller).hangup_reason, what="hung up")
        assert fake.channel(caller).hangup_reason == "congestion" and not fake.channel(caller).answered
        await eventually(lambda: sd.capacity.released == [caller], what="lease released")
        await eventually(lambda: svc.controller.calls == {}, what="call forgotten")
        assert sd.engines[0].closed and sd.medias[0].stopped  # nothing of the call is left open
        assert not fake.bridges


async def test_our_hangup_via_control_api_and_cli() -> None:
    sd = standin_deps()
    async with fake_and_bridge(sd.deps()) as (fake, svc):
        first = await _active_call(fake, sd)
        status, body = await _post(f"{svc.http_url}/calls/{first}/hangup")
        assert status == 200 and body["ok"]
        await eventually(lambda: first in sd.sink.ended_calls, what="ended")
        assert fake.channel(first).hangup_reason == "normal"
        assert sd.sink.ended_calls[first][0] == "hangup_requested"
        second = await _active_call(fake, sd)
        runner = CliRunner()
        result = await asyncio.to_thread(
            runner.invoke, cli, ["calls", "hangup", second, "--bridge-url", svc.http_url,
                                 "--token-file", str(control_token_file())]
        )
        assert result.exit_code == 0, result.output
        await eventually(lambda: second in sd.sink.ended_calls, what="ended via CLI")
        # unknown call: one clear line, non-zero exit
        result = await asyncio.to_thread(
            runner.invoke, cli, ["calls", "hold", "no-such-call", "--bridge-url", svc.http_url,
                                 "--token-file", str(control_token_file())]
        )
        assert result.exit_code == 1
        assert "no live call no-such-call (HTTP 404)" in result.output
        assert not fake.bridges


async def test_dtmf_zero_transfers_only_when_the_target_answers() -> None:
    """Issue 13: "transferred" only once the target answered; until then the caller is ours (music on
    hold, agent paused); after it, the target is in the caller's bridge and the slot is free."""
    route = CallRoute(did=DID, transfer_target="operators,100")
    sd = standin_deps(routes={DID: route})
    async with fake_and_bridge(sd.deps()) as (fake, svc):
        fake.ring_s = 0.3
        caller = await _active_call(fake, sd)
        call = svc.controller.get(caller)
        await fake.send_dtmf(caller, "0")
        await eventually(lambda: fake.originates, what="target dialled")
        assert fake.originates[0]["endpoint"] == "Local/100@operators/n"
        assert fake.originates[0]["appArgs"] == f"aziza-transfer,{caller}"
        # ringing: not transferred yet, the caller hears music and the agent is paused
        assert caller not in sd.sink.ended_calls and fake.channel(caller).moh_class == "default"
        assert sd.medias[0].paused and sd.capacity.held == {caller}
        # answered, joined, the agent released, the record written: in that order
        await eventually(lambda: caller in sd.sink.ended_calls, what="target answered")
        assert call.state.value == "transferred"
        target = call.transfer_channel_id
        assert target is not None and fake.channels[target].answered
        assert fake.bridges[call.bridge_id].channels == [caller, target]  # media channel gone
        assert call.media_channel_id not in fake.channels and fake.channel(caller).moh_class is None
        assert sd.sink.ended_calls[caller][0] == "transferred"
        assert sd.sink.ended_calls[caller][1]["transfers"] == [
            {"target": "operators,100", "outcome": "answered", "reason": "answered"}]
        assert ("transfer", {"target": "operators,100", "outcome": "answered"}) in [
            (k, d) for c, k, d in sd.sink.events if c == caller]
        assert sd.capacity.held == set() and sd.engines[0].closed
        assert caller in svc.controller.calls  # still ours until someone hangs up
        # the operator hangs up: the caller is hung up and nothing is left behind
        await fake.hangup_caller(target)
        await eventually(lambda: caller not in svc.controller.calls, what="call over")
        assert fake.channel(caller).hangup_reason == "normal"
        assert not fake.bridges and not fake.channels


@pytest.mark.parametrize(("outcome", "reason"), [("busy", "busy"), ("no_answer", "no_answer"),
                                                 ("unavailable", "unavailable")])
async def test_failed_transfer_brings_the_caller_back_to_the_agent(outcome: str, reason: str) -> None:
    sd = standin_deps()
    overrides = {"ari": {"transfer_timeout_s": 1}}
    async with fake_and_bridge(sd.deps(), settings_overrides=overrides) as (fake, svc):
        fake.dial_outcomes["PJSIP/operator"] = outcome
        caller = await _active_call(fake, sd)
        status, body = await _post(f"{svc.http_url}/calls/{caller}/transfer", {"target": "PJSIP/operator"})
        assert status == 200, body
        assert body["transfer"] == {"target": "PJSIP/operator", "outcome": "failed", "reason": reason}
        call = svc.controller.get(caller)
        assert call.state.value == "active" and not sd.medias[0].paused
        assert fake.channel(caller).moh_class is None and fake.channel(caller).hangup_reason is None
        assert call.transfer_channel_id not in fake.channels  # the dialled leg is gone
        assert sd.capacity.held == {caller} and not sd.engines[0].closed
        failures = [d for c, k, d in sd.sink.events if c == caller and k == "transfer_failed"]
        assert failures == [{"target": "PJSIP/operator", "outcome": "failed", "reason": reason}]
        # the agent still works: digits reach the engine, and the call ends normally
        await fake.send_dtmf(caller, "5")
        await eventually(lambda: sd.engines[0].events == [("dtmf", "5")], what="agent back")
        await fake.hangup_caller(caller)
        await eventually(lambda: caller in sd.sink.ended_calls, what="ended")
        assert sd.sink.ended_calls[caller][0] == "caller_hangup"
        assert sd.sink.ended_calls[caller][1]["transfers"] == failures


async def test_transfer_to_a_missing_extension_is_refused_before_dialling() -> None:
    """The README's example target used to drop the caller ("sent to invalid extension")."""
    route = CallRoute(did=DID, transfer_target="operators,199")
    sd = standin_deps(routes={DID: route})
    async with fake_and_bridge(sd.deps()) as (fake, svc):
        caller = await _active_call(fake, sd)
        await fake.send_dtmf(caller, "0")
        await eventually(lambda: [e for e in sd.sink.events if e[1] == "transfer_failed"], what="failure")
        failure = next(d for c, k, d in sd.sink.events if k == "transfer_failed")
        assert failure == {"target": "operators,199", "outcome": "failed", "reason": "invalid_extension"}
        assert not fake.originates and svc.controller.get(caller).state.value == "active"
        assert not sd.medias[0].paused and fake.channel(caller).hangup_reason is None
        # through the CLI: one line, exit 1
        result = await asyncio.to_thread(
            CliRunner().invoke, cli,
            ["calls", "transfer", caller, "nowhere,404", "--bridge-url", svc.http_url,
             "--token-file", str(control_token_file())],
        )
        assert result.exit_code == 1
        assert result.output.strip().splitlines() == [
            f"Error: transfer of call {caller} to nowhere,404 failed: invalid_extension; "
            "the caller is back with the agent"]


async def test_caller_hangs_up_while_the_target_rings() -> None:
    sd = standin_deps()
    overrides = {"ari": {"transfer_timeout_s": 30}}
    async with fake_and_bridge(sd.deps(), settings_overrides=overrides) as (fake, svc):
        fake.dial_outcomes["PJSIP/operator"] = "no_answer"
        caller = await _active_call(fake, sd)
        pending = asyncio.ensure_future(_post(f"{svc.http_url}/calls/{caller}/transfer",
                                              {"target": "PJSIP/operator"}))
        await eventually(lambda: fake.originates, what="dialling")
        target = svc.controller.get(caller).transfer_channel_id
        await fake.hangup_caller(caller)
        status, body = await asyncio.wait_for(pending, 10)
        assert status == 200 and body["transfer"]["reason"] == "call_ended"
        await eventually(lambda: caller in sd.sink.ended_calls, what="ended")
        assert sd.sink.ended_calls[caller][0] == "caller_hangup"
        assert target not in fake.channels and not fake.bridges


async def test_transfer_to_sip_uri_dials_through_the_callers_endpoint_via_cli() -> None:
    sd = standin_deps()
    async with fake_and_bridge(sd.deps()) as (fake, svc):
        caller = await _active_call(fake, sd)
        result = await asyncio.to_thread(
            CliRunner().invoke, cli,
            ["calls", "transfer", caller, "sip:desk@pbx.example", "--bridge-url", svc.http_url,
                                 "--token-file", str(control_token_file())],
        )
        assert result.exit_code == 0, result.output
        assert result.output.strip() == (
            f"transfer: call {caller} transferred to sip:desk@pbx.example (answered)")
        # the fake names callers PJSIP/trunk-<n>: endpoint "trunk"
        assert fake.originates[0]["endpoint"] == "PJSIP/trunk/sip:desk@pbx.example"
        assert sd.sink.ended_calls[caller][0] == "transferred"
        assert sd.capacity.held == set()


async def test_bad_transfer_target_is_400_and_call_continues() -> None:
    sd = standin_deps()
    async with fake_and_bridge(sd.deps()) as (fake, svc):
        caller = await _active_call(fake, sd)
        status, body = await _post(f"{svc.http_url}/calls/{caller}/transfer", {"target": "a b"})
        assert status == 400 and "bad transfer target" in body["error"]
        status, body = await _post(f"{svc.http_url}/calls/{caller}/transfer", {"nothing": 1})
        assert status == 400
        status, body = await _post(f"{svc.http_url}/calls/{caller}/transfer", {"target": "ivr,s,2"})
        assert status == 400 and "priority 1" in body["error"]
        # Asterisk refuses the originate: the failure is the outcome, the call goes on
        fake.fail("POST", "/channels", 400)
        status, body = await _post(f"{svc.http_url}/calls/{caller}/transfer", {"target": "IAX2/elsewhere"})
        assert status == 200 and body["transfer"]["reason"] == "unavailable"
        assert svc.controller.get(caller).state.value == "active"


async def test_dtmf_hash_hangs_up_and_other_digits_go_to_engine() -> None:
    sd = standin_deps()
    async with fake_and_bridge(sd.deps()) as (fake, _svc):
        caller = await _active_call(fake, sd)
        for digit in "58":
            await fake.send_dtmf(caller, digit)
        await eventually(lambda: len(sd.engines[0].events) == 2, what="digits at the engine")
        assert sd.engines[0].events == [("dtmf", "5"), ("dtmf", "8")]
        await fake.send_dtmf(caller, "#")
        await eventually(lambda: caller in sd.sink.ended_calls, what="# ended the call")
        cause, _, digits = sd.sink.ended_calls[caller]
        assert cause == "dtmf_hangup" and digits == "58#"
        assert fake.channel(caller).hangup_reason == "normal"


async def test_hash_plays_goodbye_then_hangs_up() -> None:
    sd = standin_deps()
    overrides = {"ari": {"goodbye_sound": "sound:vm-goodbye"}}
    async with fake_and_bridge(sd.deps(), settings_overrides=overrides) as (fake, _svc):
        caller = await _active_call(fake, sd)
        fake.playback_s = 0.2
        await fake.send_dtmf(caller, "#")
        await eventually(lambda: fake.played, what="goodbye playing")
        assert fake.played == [(caller, "sound:vm-goodbye")]
        assert sd.medias[0].paused and caller not in sd.sink.ended_calls  # engine quiet, not yet hung up
        await eventually(lambda: caller in sd.sink.ended_calls, what="hung up after the goodbye")
        assert sd.sink.ended_calls[caller][0] == "dtmf_hangup"
        assert fake.channel(caller).hangup_reason == "normal"
        # playback refused by Asterisk: hang up at once anyway
        second = await _active_call(fake, sd)
        fake.fail("POST", "/channels/{channelId}/play", 404)
        await fake.send_dtmf(second, "#")
        await eventually(lambda: second in sd.sink.ended_calls, what="hung up without goodbye")


async def test_dtmf_zero_without_transfer_target_does_not_drop_the_call() -> None:
    sd = standin_deps()
    async with fake_and_bridge(sd.deps()) as (fake, svc):
        caller = await _active_call(fake, sd)
        await fake.send_dtmf(caller, "0")
        await fake.send_dtmf(caller, "7")
        # no target: the digit is the engine's like any other
        await eventually(lambda: sd.engines[0].events == [("dtmf", "0"), ("dtmf", "7")], what="digits")
        assert caller in svc.controller.calls


async def test_hold_and_unhold_pause_media_and_use_moh() -> None:
    sd = standin_deps()
    async with fake_and_bridge(sd.deps(), settings_overrides={"ari": {"moh_class": "calm"}}) as (fake, svc):
        caller = await _active_call(fake, sd)
        leg = fake.leg_for(caller)
        assert leg is not None
        status, _ = await _post(f"{svc.http_url}/calls/{caller}/hold")
        assert status == 200
        chan = fake.channel(caller)
        assert chan.held and chan.moh_class == "calm" and sd.medias[0].paused
        status, body = await _post(f"{svc.http_url}/calls/{caller}/hold")
        assert status == 409 and "not active" in body["error"]
        received = leg.packets_received
        await eventually(lambda: sd.medias[0].dropped_while_paused > 5, what="packets arriving while held")
        assert leg.packets_received == received  # nothing sent back while held
        status, _ = await _post(f"{svc.http_url}/calls/{caller}/unhold")
        assert status == 200 and not chan.held and chan.moh_class is None and not sd.medias[0].paused
        await eventually(lambda: leg.packets_received > received + 3, what="media back after unhold")


async def test_far_end_hold_pauses_and_unhold_resumes() -> None:
    sd = standin_deps()
    async with fake_and_bridge(sd.deps()) as (fake, _svc):
        caller = await _active_call(fake, sd)
        await fake.far_end_hold(caller)
        await eventually(lambda: sd.medias[0].paused, what="paused by far end")
        await fake.far_end_hold(caller, held=False)
        await eventually(lambda: not sd.medias[0].paused, what="resumed by far end")


async def test_websocket_drop_reconnects_and_call_continues() -> None:
    sd = standin_deps()
    async with fake_and_bridge(sd.deps()) as (fake, svc):
        caller = await _active_call(fake, sd)
        leg = fake.leg_for(caller)
        assert leg is not None
        await fake.drop_websocket()
        await eventually(lambda: fake.ws_connects == 2 and svc.reconciles == 2, what="reconnected")
        assert caller in svc.controller.calls
        before = leg.packets_received
        await eventually(lambda: leg.packets_received > before + 3, what="media still flowing")
        await fake.send_dtmf(caller, "#")  # events flow again on the new socket
        await eventually(lambda: caller in sd.sink.ended_calls, what="ended after reconnect")
        assert fake.ws_params[-1] == {"app": "aziza", "subscribeAll": "true"}


async def test_channel_gone_while_disconnected_is_torn_down_after_reconcile() -> None:
    sd = standin_deps()
    async with fake_and_bridge(sd.deps()) as (fake, svc):
        gone = await _active_call(fake, sd)
        stays = await _active_call(fake, sd)
        await fake.drop_websocket(refuse_reconnect=True)
        await eventually(lambda: not svc.stream.is_connected, what="disconnected")
        await fake.vanish_channel(gone)
        # an orphaned bridge + media channel of a crashed earlier run, and a caller whose StasisStart was lost
        fake.bridges["aziza-bridge-deadbeef"] = FakeBridge("aziza-bridge-deadbeef", "left by a crash")
        late = await fake.originate_call(DID)  # event lost: nobody listening
        assert fake.events_lost > 0
        fake.allow_websocket()
        await eventually(lambda: gone in sd.sink.ended_calls, what="vanished call torn down")
        assert sd.sink.ended_calls[gone][0] == "caller_gone_while_disconnected"
        assert "aziza-bridge-deadbeef" not in fake.bridges
        assert stays in svc.controller.calls
        await eventually(lambda: late in sd.sink.answered_calls, what="lost caller adopted")
        gone_call_bridges = [b for b in fake.bridges.values() if gone in b.channels]
        assert gone_call_bridges == []


@pytest.mark.parametrize("status", [404, 409, 500])
async def test_answer_failure_tears_down_cleanly(status: int) -> None:
    sd = standin_deps()
    async with fake_and_bridge(sd.deps()) as (fake, svc):
        fake.fail("POST", "/channels/{channelId}/answer", status)
        caller = await fake.originate_call(DID)
        await eventually(lambda: caller in sd.sink.ended_calls, what="ended")
        assert sd.sink.ended_calls[caller][0] == f"ari_error:{status}"
        assert sd.capacity.held == set() and sd.engines[0].closed
        assert svc.controller.calls == {}
        assert not fake.bridges and all(not c.name.startswith("UnicastRTP") for c in fake.channels.values())
        # the process is fine: the next call works
        await _active_call(fake, sd)


async def test_add_channel_waits_for_media_stasis_start() -> None:
    sd = standin_deps()
    async with fake_and_bridge(sd.deps()) as (fake, _svc):
        fake.media_stasis_delay_s = 0.3
        await _active_call(fake, sd)
        add = [r for r in fake.requests if r.route == "/bridges/{bridgeId}/addChannel"]
        assert [r.status for r in add] == [204]


async def test_garbage_events_are_counted_and_dropped() -> None:
    sd = standin_deps()
    async with fake_and_bridge(sd.deps()) as (fake, svc):
        caller = await _active_call(fake, sd)
        await fake.emit_raw("not json")
        await fake.emit_raw('{"type": "StasisStart", "channel": 5}')
        await fake.emit_raw('{"type": "SomethingNew", "application": "aziza"}')
        await fake.emit_raw("[1, 2]")
        await fake.send_dtmf(caller, "#")
        await eventually(lambda: caller in sd.sink.ended_calls, what="still processing events")
        assert svc.stream.stats.bad_messages == 3
        assert svc.stream.stats.unknown_events >= 1


async def test_caller_hangs_up_during_setup() -> None:
    sd = standin_deps()
    async with fake_and_bridge(sd.deps()) as (fake, _svc):
        fake.media_stasis_delay_s = 0.5
        caller = await fake.originate_call(DID)
        await eventually(lambda: any(r.route == "/channels/externalMedia" for r in fake.requests),
                         what="media setup")
        await fake.hangup_caller(caller)
        await eventually(lambda: caller in sd.sink.ended_calls, what="ended")
        assert sd.capacity.held == set()
        await eventually(lambda: not fake.bridges, what="bridge deleted")
        assert all(not c.name.startswith("UnicastRTP") for c in fake.channels.values())


async def test_health_and_metrics() -> None:
    sd = standin_deps()
    async with fake_and_bridge(sd.deps()) as (fake, svc):
        await _active_call(fake, sd)
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{svc.http_url}/health", headers=control_headers()) as resp:
                health = await resp.json()
            async with http.get(f"{svc.http_url}/metrics", headers=control_headers()) as resp:
                metrics = await resp.text()
        assert health["ari_connected"] and health["live_calls"] == 1 and health["ok"]
        assert "aziza_calls_active 1.0" in metrics
        assert 'aziza_ari_events_total{type="StasisStart"}' in metrics


async def test_a_failing_record_sink_costs_nothing_but_that_record() -> None:
    sd = standin_deps()

    def broken_ended(*args: Any) -> None:
        raise RuntimeError("records are down")

    sd.sink.ended = broken_ended  # type: ignore[method-assign,assignment]
    async with fake_and_bridge(sd.deps()) as (fake, svc):
        first = await _active_call(fake, sd)
        await fake.hangup_caller(first)
        await eventually(lambda: first not in svc.controller.calls, what="first call gone")
        assert sd.capacity.held == set() and not fake.bridges
        second = await _active_call(fake, sd)
        assert second in svc.controller.calls


async def test_shutdown_tears_down_live_calls() -> None:
    sd = standin_deps()
    async with fake_and_bridge(sd.deps()) as (fake, svc):
        callers = [await _active_call(fake, sd) for _ in range(3)]
        await svc.stop()
        assert all(fake.channel(c).hangup_reason == "normal" for c in callers)
        assert not fake.bridges and sd.capacity.held == set()
        assert {c: sd.sink.ended_calls[c][0] for c in callers} == dict.fromkeys(callers, "shutdown")


async def test_hold_refused_by_asterisk_leaves_call_active() -> None:
    sd = standin_deps()
    async with fake_and_bridge(sd.deps()) as (fake, svc):
        caller = await _active_call(fake, sd)
        fake.fail("POST", "/channels/{channelId}/moh", 500)
        status, body = await _post(f"{svc.http_url}/calls/{caller}/hold")
        assert status == 502 and "500" in body["error"]
        assert svc.controller.get(caller).state.value == "active"
        assert not sd.medias[0].paused and not fake.channel(caller).held


async def test_events_in_order_per_call_and_calls_independent() -> None:
    sd = standin_deps()
    sd.routes.routes[DID] = CallRoute(did=DID, dtmf_actions={})
    async with fake_and_bridge(sd.deps()) as (fake, _svc):
        slow = await _active_call(fake, sd)
        fast = await _active_call(fake, sd)
        slow_engine, fast_engine = sd.engines
        slow_engine.gate = asyncio.Event()  # the slow call's engine hangs for now
        digits = "123456789*0#" * 5
        for d in digits:
            await fake.send_dtmf(slow, d)
            await fake.send_dtmf(fast, d)
        await eventually(lambda: len(fast_engine.events) == len(digits), what="fast call's digits")
        assert "".join(v for _, v in fast_engine.events) == digits
        assert slow_engine.events == []  # still blocked, and it did not hold the other call up
        slow_engine.gate.set()
        await eventually(lambda: len(slow_engine.events) == len(digits), what="slow call's digits")
        assert "".join(v for _, v in slow_engine.events) == digits
