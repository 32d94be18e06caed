#!/usr/bin/env python3
"""Sorts `perf script` samples of the registrar's runtime threads (comm
mcpctl-registra*) into the rows of docs/benchmark.md's per-task breakdown:
a kernel sample by what is under it (the scheduler first, then the syscall, then
the network stack), a user sample by its innermost frame's crate (malloc/free and
mem* by symbol). Prints each row's share, and its µs when given the runtime
threads' CPU per task.

  perf record -F 999 --call-graph dwarf,16384 -o seq.data -- \
    node bench/run.mjs --only addon --rounds 3 --scenario sequential --addon X.node
  perf script -i seq.data --no-inline -F comm,tid,ip,sym,dso | \
    python3 bench/perf-breakdown.py US_PER_TASK X.node

X.node must keep its symbols (CARGO_PROFILE_RELEASE_STRIP=none). perf 6.1 does not
symbolize this lld-linked object itself (it prints file offsets), so the script
reads its symbols with `nm` and maps the offsets. SHOW='row name' lists a row's
innermost frames.
"""
import re, sys, collections
ROWS = [
  'malloc/free', 'hyper/reqwest/http/url', 'kernel: TCP loopback send/receive',
  'registrar logic', 'JSON (serde_json)', 'memcpy/memmove', 'tokio scheduler, timers, I/O driver',
  'tracing', 'kernel: epoll_wait', 'kernel: scheduler', 'kernel: futex', 'kernel: other',
  'threadsafe call (napi)', 'SSE read and parse', 'other user code',
]
MALLOC = re.compile(r'^(__rustc::\w+|_mid_memalign\S*)$|^(__libc_)?(cfree@GLIBC_2.2.5|unlink_chunk.constprop.0|__lll_lock_wait_private|__lll_lock_wake_private|malloc|free|cfree|realloc|calloc|_int_malloc|_int_free|_int_realloc|malloc_consolidate|unlink_chunk|tcache_\w+|__GI___libc_malloc|__GI___libc_free|__libc_free|__libc_malloc|__rust_alloc|__rust_dealloc|__rust_realloc|__rdl_\w+|__rg_\w+|_int_free_merge_chunk|_int_free_create_chunk|_int_free_maybe_consolidate|arena_get2|sysmalloc|alloc_perturb)$')
MEMCPY = re.compile(r'^(__)?mem(cpy|move|set|cmp)|__memmove|__memcpy|__memset|__memcmp')
CRATE = re.compile(r'(?:^|[<\s&(*,])([a-z_][a-z0-9_]*)::')
HTTP = {'hyper','hyper_util','reqwest','http','http_body','http_body_util','url','h2','tower','tower_http','tower_service','tower_layer','idna','form_urlencoded','httparse','want','try_lock','rustls','hyper_rustls','percent_encoding','ipnet','sync_wrapper','bytes','httpdate','encoding_rs','mime'}
TOKIO = {'tokio','tokio_util','mio','futures_util','futures_core','futures_channel','futures','parking_lot','parking_lot_core','crossbeam_utils','crossbeam_epoch','crossbeam_queue','pin_project_lite','slab','socket2','lock_api','event_listener'}
TRACE = {'tracing','tracing_core','tracing_subscriber','sharded_slab','thread_local'}
NET = re.compile(r'tcp_|__tcp|ip_|ipv4|net_rx|__dev_queue|loopback|sock_|inet_|skb|__netif|napi_|netif_|dev_hard_start|__sys_sendto|__sys_recvfrom|sendmsg|recvmsg|process_backlog|do_softirq|__do_softirq|_copy_to_iter|_copy_from_iter|__x64_sys_(sendto|recvfrom|write|writev|read|readv|sendmsg|recvmsg)')
SCHED = re.compile(r'^(__schedule|schedule|finish_task_switch|schedule_hrtimeout_range|try_to_wake_up|__switch_to|psi_\w+|dequeue_task\w*|enqueue_task\w*|pick_next_task\w*|update_curr|__wake_up\w*|ttwu_\w+|select_task_rq\w*)')

def kernel_row(frames):
  syms = [f[0] for f in frames]
  joined = ' '.join(syms)
  sysname = None
  for s in syms:
    m = re.match(r'__(x64|do)_sys_(\w+)', s)
    if m: sysname = m.group(2); break
  if any(SCHED.match(s) for s in syms[:6]): return 'kernel: scheduler'
  if sysname and sysname.startswith('futex'): return 'kernel: futex'
  if sysname and sysname.startswith('epoll'): return 'kernel: epoll_wait'
  if NET.search(joined): return 'kernel: TCP loopback send/receive'
  return 'kernel: other'

def user_row(frames):
  first = frames[0][0]
  if MALLOC.match(first): return 'malloc/free'
  if MEMCPY.search(first): return 'memcpy/memmove'
  napi = False
  for sym, dso in frames:
    if 'napi' in sym and ('threadsafe' in sym or 'call_threadsafe' in sym or 'ThreadsafeFunction' in sym): napi = True
    if MALLOC.match(sym): return 'malloc/free'
    crates = [c for c in CRATE.findall(sym) if c not in ('core','alloc','std','_','impl','hashbrown','indexmap')]
    if not crates: continue
    c = crates[0]
    if c == 'mcpctl_registrar':
      if re.search(r'mcpctl_registrar::(channel|sse)', sym): return 'SSE read and parse'
      if 'mcpctl_registrar::logging' in sym: return 'tracing'
      if 'mcpctl_registrar::binding' in sym: return 'threadsafe call (napi)'
      return 'registrar logic'
    if c == 'prometheus': return 'registrar logic'
    if c in HTTP: return 'hyper/reqwest/http/url'
    if c in ('serde_json','serde'): return 'JSON (serde_json)'
    if c in TOKIO: return 'tokio scheduler, timers, I/O driver'
    if c in TRACE: return 'tracing'
    if c in ('napi','napi_sys'): return 'threadsafe call (napi)'
    return 'other user code'
  if napi: return 'threadsafe call (napi)'
  return 'other user code'

import bisect, subprocess, os
SYMS = []; ADDRS = []; DELTA = 0
def load_syms(path):
  global DELTA
  out = subprocess.run(['nm', '-C', '--defined-only', path], capture_output=True, text=True).stdout
  for l in out.splitlines():
    p = l.split(' ', 2)
    if len(p) == 3 and p[1] in 'tTwW':
      SYMS.append((int(p[0], 16), p[2]))
  SYMS.sort(); ADDRS.extend(a for a, _ in SYMS)
  # perf 6.1 prints the file offset for this lld-linked object, whose text
  # segment's vaddr is not its offset: add the difference.
  for l in subprocess.run(['readelf', '-lW', path], capture_output=True, text=True).stdout.splitlines():
    f = l.split()
    if f and f[0] == 'LOAD' and 'E' in f[6:8]:
      DELTA = int(f[2], 16) - int(f[1], 16)
def resolve(addr):
  i = bisect.bisect_right(ADDRS, addr + DELTA) - 1
  return SYMS[i][1] if i >= 0 else '[unknown]'

SHOWN = collections.Counter()
def main():
  total_us = float(sys.argv[1]) if len(sys.argv) > 1 else None
  if len(sys.argv) > 2: load_syms(sys.argv[2])
  counts = collections.Counter(); n = 0
  comm = None; frames = []
  def flush():
    nonlocal n
    if comm and comm.startswith('mcpctl-regis') and frames:
      row = kernel_row(frames) if '[kernel' in frames[0][1] else user_row(frames)
      counts[row] += 1; n += 1
      if os.environ.get('SHOW') == row: SHOWN[frames[0][0][:90] + ' | ' + (frames[1][0][:60] if len(frames) > 1 else '')] += 1
  for line in sys.stdin:
    if not line.strip():
      flush(); comm = None; frames = []; continue
    if not line.startswith((' ', '\t')):
      flush(); frames = []
      comm = line.split()[0]
      continue
    m = re.match(r'\s*([0-9a-f]+)\s+(.*?)\s+\((.*)\)\s*$', line)
    if m:
      sym = re.sub(r'\+0x[0-9a-f]+$', '', m.group(2))
      if sym == '[unknown]' and m.group(3).endswith('.node') and SYMS:
        sym = resolve(int(m.group(1), 16))
      if sym == '[unknown]' and m.group(3) == '[unknown]':
        continue
      frames.append((sym, m.group(3)))
  flush()
  for k, v in SHOWN.most_common(25): print(v, k)
  print(f'samples of the runtime threads: {n}')
  for row in ROWS:
    share = counts[row] / n if n else 0
    us = f'{share * total_us:.1f}' if total_us else ''
    print(f'| {row} | {share*100:.1f}% | {us} |')
main()
