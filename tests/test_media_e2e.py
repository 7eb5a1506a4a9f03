"""A whole simulated call with media: the daemon's simulated camera and microphone, real H.264
and Opus, over real mutual TLS to the reference server, which records it (issue 4)."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path

import av
import pytest
from websockets.asyncio.client import connect

from tabletd.media.frames import Stream, decode_frame
from tabletd.session import State

from .conftest import wait_for
from .test_link import DEVICE, Net, open_net


@pytest.fixture
async def media_net(tmp_path: Path) -> AsyncIterator[Net]:
    async with open_net(tmp_path / "srv", downlink=True) as net:
        yield net


def decoded_video_frames(path: Path) -> int:
    with av.open(str(path)) as container:
        return sum(1 for _ in container.decode(video=0))


@pytest.mark.timeout(60)
async def test_a_call_is_recorded_and_nothing_is_sent_after_the_deadline(
        media_net: Net, start_daemon) -> None:
    net = media_net
    run = await start_daemon(net.config())
    d = run.daemon
    fps = d.cfg.media.fps
    await wait_for(lambda: d.machine.link_up, within=10)
    session = net.server.book(DEVICE, in_s=0.2, duration_s=4)
    await wait_for(lambda: d.machine.state is State.LIVE, within=5)

    # the relative's media reaches the local screen while live
    port = d.status_server.port
    downlink: list[int] = []
    async with connect(f"ws://127.0.0.1:{port}/v1/media/stream") as ws:
        async with asyncio.timeout(5):
            while len(downlink) < 5:
                frame = decode_frame(await ws.recv())  # type: ignore[arg-type]
                downlink.append(frame.stream)
    assert Stream.VIDEO in downlink

    # the tablet's own camera reaches the screen's preview: video only (never its own sound)
    own: list[int] = []
    async with connect(f"ws://127.0.0.1:{port}/v1/media/self") as ws:
        async with asyncio.timeout(5):
            while len(own) < 10:
                own.append(decode_frame(await ws.recv()).stream)  # type: ignore[arg-type]
    assert set(own) == {Stream.VIDEO}

    await wait_for(lambda: d.machine.state is State.ENDED, within=8)
    # after the cut the preview is silent: nothing is published outside a live call
    async with connect(f"ws://127.0.0.1:{port}/v1/media/self") as ws:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.5):
                await ws.recv()
    sent_at_end = d.link.media_sent
    await asyncio.sleep(0.5)  # the camera's own teardown runs after the cut
    assert d.link.media_sent == sent_at_end, "media sent after the call ended"
    assert net.server.frames_after_deadline(session) == 0
    await wait_for(lambda: d.store.count() == 0, within=10)

    path = net.server.recording_path(session)
    assert path is not None and path.exists()
    frames = decoded_video_frames(path)
    expected = 4 * fps
    assert abs(frames - expected) <= 0.05 * expected + 1, (frames, expected)
    print(f"recorded {frames} video frames for {expected} expected; "
          f"{d.link.media_sent} media frames sent")
    assert not list(d.paths.state_dir.rglob("*.ts")), "media stored on the tablet"


@pytest.mark.timeout(90)
async def test_slow_link_keeps_memory_bounded_and_recovers_at_a_keyframe(
        media_net: Net, start_daemon) -> None:
    net = media_net
    cfg = net.config()
    # keepalive must not give up on a link that is slow rather than dead
    cfg = dataclasses.replace(cfg, link=dataclasses.replace(cfg.link, ping_interval_s=10,
                                                            ping_timeout_s=10))
    run = await start_daemon(cfg)
    d = run.daemon
    await wait_for(lambda: d.machine.link_up, within=10)
    session = net.server.book(DEVICE, in_s=0.2, duration_s=60)
    await wait_for(lambda: d.machine.state is State.LIVE, within=5)
    await wait_for(lambda: d.link.media_sent > 20, within=5)
    # 1 KB/s: far below the stream. The socket buffers below the queue fill first (a few
    # hundred KB), then the sender blocks and the queue must drop, never grow.
    net.proxy.set_mode("throttle", rate_bps=1024)
    peak = 0
    async with asyncio.timeout(30):
        while True:
            peak = max(peak, d.link.uplink.queued_bytes)
            if d.link.uplink.stats.keyframe_requests > 0:  # video dropped, keyframe asked
                break
            await asyncio.sleep(0.01)
    assert peak <= d.link.uplink.max_bytes
    net.proxy.set_mode("pass")
    recovered_from = net.server.media_received
    await wait_for(lambda: net.server.media_received > recovered_from + 50, within=20)
    net.server.end(session)
    await wait_for(lambda: d.machine.state is State.ENDED, within=10)
    path = net.server.recording_path(session)
    assert path is not None and decoded_video_frames(path) > 0
    assert net.server.frames_after_deadline(session) == 0


@pytest.mark.timeout(60)
async def test_camera_that_cannot_start_ends_the_call_with_camera_fault(
        media_net: Net, start_daemon) -> None:
    net = media_net
    run = await start_daemon(net.config())
    d = run.daemon
    d._camera.fail_starts(100, "Cannot allocate memory")
    await wait_for(lambda: d.machine.link_up, within=10)
    net.server.book(DEVICE, in_s=0.2, duration_s=30)
    await wait_for(lambda: d.machine.state is State.ENDED, within=20)
    assert d.machine.snapshot.end_reason == "camera_fault"
    assert not d.guard.rail_on
    await wait_for(lambda: d.store.count() == 0, within=10)
    kinds = [e.kind for e in net.server.events(DEVICE)]
    assert "media_fault" in kinds
    fault = next(e for e in net.server.events(DEVICE) if e.kind == "media_fault")
    assert "Cannot allocate memory" in fault.fields["detail"]
