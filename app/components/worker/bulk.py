"""``enqueue_many``: validate and encode every job first, then send the call in chained chunks.

A call first validates and encodes all its jobs, so any invalid request raises before anything
is written. Its chunks of ``CHUNK`` jobs then go to ``enqueue.lua`` back to back on one
connection: the producer builds and packs chunk n+1 while Redis runs chunk n, and reads every
reply at the end (a producer's Python and Redis's script time overlap instead of adding up).

The chunks of one call form a chain (``Keys.enqueue_chain``, a hash kept ten minutes): chunk
n runs only if chunk n-1 was applied, so a chunk Redis refuses (out of memory) stops the rest,
exactly as if each had waited for the one before, and the error can say how many jobs were
accepted; a chunk resent after a lost reply returns the flags of its first run instead of
running twice. The chain also lets jobs with fresh ids skip the script's per-job record check
(a fresh id cannot be taken, and a resend is recognised by the chain).

Jobs without per-job options (priority, target, fallback, tags, timeout, max_tries) on a queue
without producer hooks use a plan resolved once per (task, queue): their envelope text is
assembled from the plan's fixed parts, the same bytes as ``Envelope.encode`` (tested). Anything
else, and anything unusual in the arguments (text that needs the surrogate check, deep
nesting, a payload over the limit), goes through ``WorkerClient._envelope``, the reference.
Redis Cluster and ``REDIS_WAIT_REPLICAS`` keep one ``_accept`` call per 1000 jobs.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, NamedTuple

from hiredis import pack_command
from redis.commands.core import CoreCommands
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from app.components.worker.envelope import _ENCODER, _STR, Envelope, now_ms, send_id
from app.components.worker.validation import MAX_DEPTH, validate_delay, validate_job_id
from app.core.errors import RedisUnavailable

if TYPE_CHECKING:
    from app.components.worker.api import Job, JobRequest, WorkerClient

CHUNK = 250  # jobs per chained script call: Redis runs one while the next is built; its fixed costs stay small
FIRST_CHUNK = 64  # the first is smaller: Redis waits for nothing but it


def bounds(n: int) -> list[tuple[int, int]]:
    """The (start, end) of each chunk of a call of ``n`` jobs."""
    edges = [0, *range(min(FIRST_CHUNK, n), n, CHUNK), n] if n else []
    return list(zip(edges, edges[1:], strict=False))


_HEAD = '{"id":""'
_VARIANT = {c: "89ab"[int(c, 16) & 3] for c in "0123456789abcdef"}  # a UUID4's variant digit, from any hex digit
_DRAW = 256  # jobs' random bits drawn in one os.urandom call
_TAIL = ',"args":[],"kwargs":{},"try":1,"enqueued_at":0,"run":""}'


class Recorder(CoreCommands):
    """Collects the commands an engine adapter's ``stage`` queues, with redis-py's own argument
    building, as plain words for ``enqueue.lua``'s ARGV: never sent, so none of a pipeline's
    bookkeeping. The per-message commands (XADD, PSETEX) take a direct path (the same words,
    tested against a redis-py pipeline's)."""

    def __init__(self) -> None:
        self.command_stack: list[tuple[Any, ...]] = []

    def execute_command(self, *args: Any, **options: Any) -> None:
        self.command_stack.append(args)

    def xadd(self, name: Any, fields: Any, id: Any = "*", **options: Any) -> None:  # noqa: A002 - redis-py's name
        if options:
            return super().xadd(name, fields, id, **options)  # type: ignore[no-any-return]
        words = ["XADD", name, id]
        for pair in fields.items():
            words.extend(pair)
        self.command_stack.append(tuple(words))
        return None

    def psetex(self, name: Any, time_ms: Any, value: Any) -> None:
        if type(time_ms) is not int:
            return super().psetex(name, time_ms, value)  # type: ignore[no-any-return]
        self.command_stack.append(("PSETEX", name, time_ms, value))
        return None


class Plan:
    """What the jobs of one (task, queue, routing) share: the fields ``enqueue.lua`` takes once
    per shape, and for the fast path the envelope's fixed middle (task, queue, routing)."""

    __slots__ = ("task", "queue", "prefix", "routed", "priority", "group", "selector", "limited", "fallback",
                 "keep", "tags", "mid")

    def __init__(self, client: WorkerClient, task: str, queue: str, routed: bool, priority: str, group: str,
                 selector: str, limited: str, fallback: str, tags: str) -> None:
        pq = client.queue(queue)
        self.task, self.queue, self.prefix, self.routed = task, queue, pq.prefix, routed
        self.priority, self.group, self.selector, self.limited = priority, group, selector, limited
        self.fallback, self.keep, self.tags = fallback, max(pq.config.keep_result, 1), tags
        self.mid = ""


class Item(NamedTuple):
    """One validated job of a bulk call."""

    id: str
    run: str
    raw: str
    delay_ms: int
    chosen: bool
    plan: Plan
    env: Envelope | None  # built where producer hooks or a fallback path need it


class Bulk:
    """The bulk path of one ``WorkerClient`` (plans are cached per client, like its queues)."""

    def __init__(self, client: WorkerClient) -> None:
        self.client = client
        self._fast: dict[tuple[Any, Any], Plan | None] = {}  # (task ref, queue) -> plan; None: reference path
        self._plans: dict[tuple[Any, ...], Plan] = {}
        self._max_bytes = client.settings.worker_max_payload_bytes

    def _plan(self, task: str, queue: str, routed: bool, priority: str, group: str, selector: str,
              limited: str, fallback: str, tags: str) -> Plan:
        key = (task, queue, routed, priority, group, selector, limited, fallback, tags)
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = Plan(self.client, *key)
        return plan

    def _fast_plan(self, task: Any, queue: str | None) -> Plan | None:
        """The plan of an option-free job of ``task``, or None when it takes the reference path
        (its queue has producer hooks, which get an Envelope). Raises like ``_envelope`` for an
        unknown task or queue."""
        try:
            return self._fast[(task, queue)]
        except KeyError:
            pass
        except TypeError:  # an unhashable task reference: the reference path says what is wrong
            return None
        client = self.client
        spec = client.registry.task(task, queue)
        pq = client.queue(spec.queue)
        plan = None
        if not (pq.chain.has("before_enqueue") or pq.chain.has("after_enqueue")):
            route = pq.route(spec, None, None, None, None)
            routed = route.needed or pq.config.routed
            limited = spec.rate_limit is not None
            text = Envelope("", spec.name, spec.queue, [], {}, 1, 0, "", route.priority, route.group, route.selector,
                            routed, {}, limited).encode()
            if text.startswith(_HEAD) and text.endswith(_TAIL):
                plan = self._plan(spec.name, spec.queue, routed, route.priority, route.group, route.selector,
                                  spec.name if limited else "", route.fallback, "")
                plan.mid = text[len(_HEAD):-len(_TAIL)]
        self._fast[(task, queue)] = plan
        return plan

    def _reference(self, req: JobRequest, delay_ms: int) -> Item:
        env, raw, fallback = self.client._envelope(
            req.task, tuple(req.args), dict(req.kwargs), req.queue, req.job_id,
            (req.priority, req.worker_group, req.worker_selector, req.fallback, req.tags, req.timeout, req.max_tries))
        plan = self._plan(env.task, env.queue, env.routed, env.priority, env.group, env.selector,
                          env.task if env.limited else "", fallback, env.tags_text if env.tags else "")
        return Item(env.id, env.run, raw, delay_ms, req.job_id is not None, plan, env)

    def prepare(self, requests: Iterable[JobRequest]) -> list[Item]:
        """Every request validated and encoded; raises (writing nothing) on the first invalid one."""
        items: list[Item] = []
        append = items.append
        encode = _ENCODER.encode
        max_bytes = self._max_bytes
        new_item = tuple.__new__  # an Item without its generated __new__'s Python frame
        blob, at = "", 0  # random hex for ids and run tokens, 48 digits a job, drawn for _DRAW jobs at once
        for req in requests:
            delay, job_id = req.delay, req.job_id
            if job_id is not None:  # checked first, as the reference does
                validate_job_id(job_id)
            delay_ms = int(round(validate_delay(delay) * 1000)) if delay is not None else 0
            plan = None
            if (req.priority is None and req.worker_group is None and req.worker_selector is None
                    and req.fallback is None and req.tags is None and req.timeout is None and req.max_tries is None):
                plan = self._fast_plan(req.task, req.queue)
            if plan is None or not plan.mid:
                append(self._reference(req, delay_ms))
                continue
            args, kwargs = req.args, req.kwargs
            if type(args) is not tuple and type(args) is not list:
                args = tuple(args)
            try:
                args_text = encode(args) if args else "[]"
                kwargs_text = encode(kwargs) if kwargs else "{}"
            except (TypeError, ValueError, RecursionError):
                append(self._reference(req, delay_ms))  # raises the reference's PayloadError
                continue
            if type(kwargs) is not dict:
                append(self._reference(req, delay_ms))
                continue
            if at == len(blob):
                blob, at = os.urandom(24 * _DRAW).hex(), 0
            run = blob[at + 32:at + 48]
            if job_id is None:  # new_job_id()'s UUID4 (version 4, RFC 4122 variant) from the drawn digits
                job_id = (blob[at:at + 12] + "4" + blob[at + 13:at + 16] + _VARIANT[blob[at + 16]]
                          + blob[at + 17:at + 32])
                head = '{"id":"' + job_id + '"'
            else:
                head = '{"id":' + _STR(job_id)
            at += 48
            raw = (f'{head}{plan.mid},"args":{args_text},"kwargs":{kwargs_text},"try":1,'
                   f'"enqueued_at":{now_ms()},"run":"{run}"}}')
            if "\\ud" in raw or len(raw) > max_bytes or raw.count("[") + raw.count("{") > MAX_DEPTH:
                append(self._reference(req, delay_ms))  # the reference checks (and may refuse) it
                continue
            append(new_item(Item, (job_id, run, raw, delay_ms, req.job_id is not None, plan, None)))
        return items

    async def enqueue_many(self, requests: Iterable[JobRequest]) -> list[Job | None]:
        from app.components.worker.api import Job

        client = self.client
        items = self.prepare(requests)
        engines: dict[str, str] = {}  # queue -> its engine, checked once per call
        for item in items:
            queue = item.plan.queue
            if queue not in engines:
                await client._check_engine(queue)
                engines[queue] = client.engine_of(queue)
        hooked = {queue: chain for queue in engines if (chain := client._chain(queue)).has("before_enqueue")}
        for item in items if hooked else ():
            chain = hooked.get(item.plan.queue)
            if chain is not None and item.env is not None:
                await chain.call("before_enqueue", client._hook_view(item.env, None), job_id=item.id)
        if getattr(client.keys, "cluster", False) or client.settings.redis_wait_replicas:
            flags = await self._per_call(items, engines)
        else:
            flags = await self._chained(items, engines)
        hooked = {queue: chain for queue in engines if (chain := client._chain(queue)).has("after_enqueue")}
        for item, ok in zip(items, flags, strict=True) if hooked else ():
            chain = hooked.get(item.plan.queue)
            if ok and chain is not None and item.env is not None:
                await chain.call("after_enqueue", client._hook_view(item.env, None), job_id=item.id)
        return [Job(client, item.id, item.plan.queue, item.plan.task) if ok else None
                for item, ok in zip(items, flags, strict=True)]

    async def _per_call(self, items: list[Item], engines: dict[str, str]) -> list[int]:
        """One ``_accept`` (one script call, WAIT after it when asked) per 1000 jobs."""
        from app.components.worker.api import ENQUEUE_CHUNK, Accepting

        client = self.client
        flags: list[int] = []
        try:
            for start in range(0, len(items), ENQUEUE_CHUNK):
                flags += await client._accept([
                    Accepting(item.env or Envelope.decode(item.raw), item.raw, item.delay_ms, engines[item.plan.queue],
                              item.chosen, item.plan.fallback) for item in items[start:start + ENQUEUE_CHUNK]])
        except RedisError as exc:
            raise client._refused(exc, accepted=sum(1 for f in flags if f), total=len(items)) from None
        return flags

    async def chunk_args(self, items: list[Item], engines: dict[str, str], position: int) -> list[Any]:
        """The ARGV of one chained ``enqueue.lua`` call (see its header), ending with ``position``."""
        client = self.client
        keys, settings = client.keys, client.settings
        recorder = Recorder()

        async def staged(queue: str, messages: list[tuple[str, str]]) -> list[tuple[Any, ...]]:
            await client._adapter(queue).stage(recorder, messages)
            commands, recorder.command_stack = recorder.command_stack, []
            return commands

        healthy_ms = int(settings.worker_warning_after * 1000)
        dead_ttl = settings.worker_dead_ttl_seconds
        shapes: dict[tuple[Plan, bool, bool], int] = {}
        shape_args: list[Any] = []
        per_job: list[Any] = []
        batched: dict[str, list[tuple[str, str]]] = {}
        for item in items:
            plan, delay_ms, chosen = item.plan, item.delay_ms, item.chosen
            engine_path = not delay_ms and not plan.routed
            key = (plan, delay_ms > 0, chosen)
            number = shapes.get(key)
            if number is None:
                number = shapes[key] = len(shapes) + 1
                shape_args += [plan.task, plan.queue, engines[plan.queue], keys.delayed(plan.queue) if delay_ms else "",
                               keys.delayed_wake(plan.queue) if delay_ms else "", int(engine_path and not chosen),
                               plan.prefix, int(plan.routed), plan.priority, plan.group, plan.selector, plan.limited,
                               plan.fallback, healthy_ms, plan.keep, dead_ttl, plan.tags, int(chosen)]
            if engine_path and chosen:
                commands = await staged(plan.queue, [(send_id(item.id), item.raw)])
                per_job += [item.id, item.run, item.raw, number, delay_ms, len(commands)]
                for words in commands:
                    per_job += [len(words), *words]
                continue
            if engine_path:
                found = batched.get(plan.queue)
                if found is None:
                    found = batched[plan.queue] = []
                found.append((send_id(item.id), item.raw))
            per_job += [item.id, item.run, item.raw, number, delay_ms, 0]
        args: list[Any] = [settings.worker_events_maxlen, keys.job(""), keys.result(""), keys.instances, len(shapes),
                           *shape_args, len(items), *per_job, len(batched)]
        for queue, messages in batched.items():
            block = await staged(queue, messages)
            args += [client.queue(queue).prefix, len(block)]
            for words in block:
                args += [len(words), *words]
        args.append(position)
        return args

    async def _chained(self, items: list[Item], engines: dict[str, str]) -> list[int]:
        """The call's chunks as chained script calls on one connection, each sent as soon as it
        is built; replies read at the end. A dropped connection resends the whole chain (chunks
        already applied answer with their flags); NOSCRIPT loads the script and resends."""
        client = self.client
        script = client._enqueue_script
        chain = client.keys.enqueue_chain(os.urandom(8).hex())
        head = ("EVALSHA", script.sha, 2, client.keys.events, chain)
        pool = client.redis.connection_pool
        packed: list[bytes] = []
        chunks = bounds(len(items))
        conn = await pool.get_connection()

        async def read_all() -> list[Any]:
            replies: list[Any] = []
            for _ in packed:  # every reply is read, an error one too, so none is left on the connection
                try:
                    replies.append(await conn.read_response())
                except ResponseError as exc:
                    replies.append(exc)
            return replies

        async def once() -> list[Any]:
            await conn.send_packed_command(packed)
            return await read_all()

        async def dropped(_: BaseException) -> None:
            await conn.disconnect()

        try:
            try:
                for position, (start, end) in enumerate(chunks, 1):
                    packed.append(pack_command((*head, *await self.chunk_args(items[start:end], engines, position))))
                    await conn.send_packed_command(packed[-1])
                replies = await read_all()
            except (RedisConnectionError, RedisTimeoutError, OSError):
                await conn.disconnect()
                for position, (start, end) in enumerate(chunks, 1):
                    if position > len(packed):
                        packed.append(pack_command((*head, *await self.chunk_args(items[start:end], engines,
                                                                                   position))))
                replies = await conn.retry.call_with_retry(once, dropped)
            if any(isinstance(reply, NoScriptError) for reply in replies):
                await client.redis.script_load(script.script)
                replies = await conn.retry.call_with_retry(once, dropped)
        except BaseException:
            await conn.disconnect()  # replies may be left unread on it
            await pool.release(conn)
            raise
        await pool.release(conn)
        return self._flags(items, chunks, replies)

    def _flags(self, items: list[Item], chunks: list[tuple[int, int]], replies: list[Any]) -> list[int]:
        """Per job 1 accepted, 0 refused; raises for a chunk Redis refused, saying how many of the
        call's jobs were accepted (the chunks before it: the chain stops the ones after)."""
        flags: list[int] = []
        error: Exception | None = None
        broken = False
        for (start, end), reply in zip(chunks, replies, strict=True):
            size = end - start
            if isinstance(reply, list) and len(reply) == size:
                flags += [1 if int(flag) else 0 for flag in reply]
                continue
            flags += [0] * size
            if isinstance(reply, Exception):
                error = error or reply
            else:
                broken = True
        if error is None and not broken:
            return flags
        accepted = sum(flags)
        if error is not None:
            raise self.client._refused(error, accepted=accepted, total=len(items))
        raise RedisUnavailable(
            f"Redis at {_where(self.client)} lost part of a bulk enqueue (a failover?): {accepted} of {len(items)} "
            "jobs were accepted and will run; the rest were not enqueued: enqueue them again")


def _where(client: WorkerClient) -> str:
    from app.core.redis import describe

    return describe(client.settings)


__all__ = ["CHUNK", "FIRST_CHUNK", "Bulk", "Item", "Plan", "Recorder", "bounds"]
