// A TCP socket's kernel send buffer (SO_SNDBUF). Node exposes it for UDP only, so it is set
// through libc with koffi (an FFI library with prebuilt binaries). Where koffi or the call is
// not available (another platform, a failed load) nothing changes: the kernel's autotuning stays.
import { createRequire } from 'node:module';
import net from 'node:net';

// Linux values (asm-generic/socket.h).
const SOL_SOCKET = 1;
const SO_SNDBUF = 7;

interface Libc {
  setsockopt(fd: number, level: number, name: number, value: Buffer, len: number): number;
  getsockopt(fd: number, level: number, name: number, value: Buffer, len: number[]): number;
}

let libc: Libc | null | undefined;

// In the VM process's bundle (drivers/sim/vm-bundle.ts) this is koffi's absolute path: the
// bundle runs from a host's run directory, where 'koffi' would not resolve.
declare const __VMFERRY_KOFFI__: string | undefined;

function load(): Libc | null {
  if (libc !== undefined) return libc;
  libc = null;
  if (process.platform !== 'linux') return libc;
  try {
    const koffi = createRequire(import.meta.url)(typeof __VMFERRY_KOFFI__ === 'string' ? __VMFERRY_KOFFI__ : 'koffi') as { load(name: string): { func(sig: string): (...a: unknown[]) => number } };
    const lib = koffi.load('libc.so.6');
    const set = lib.func('int setsockopt(int, int, int, const void *, uint32_t)');
    const get = lib.func('int getsockopt(int, int, int, _Out_ void *, _Inout_ uint32_t *)');
    libc = { setsockopt: (...a) => set(...a), getsockopt: (...a) => get(...a) };
  } catch { /* no FFI here: autotuning stays */ }
  return libc;
}

const fdOf = (sock: net.Socket): number | null => {
  const fd = (sock as unknown as { _handle?: { fd?: number } | null })._handle?.fd;
  return typeof fd === 'number' && fd >= 0 ? fd : null;
};

/**
 * Fixes the socket's send buffer at `bytes` (Linux doubles it for its bookkeeping and turns off
 * autotuning for this socket). False when it could not be set.
 */
export function setSendBuffer(sock: net.Socket, bytes: number): boolean {
  const c = load(), fd = fdOf(sock);
  if (!c || fd === null) return false;
  const v = Buffer.alloc(4);
  v.writeInt32LE(bytes);
  return c.setsockopt(fd, SOL_SOCKET, SO_SNDBUF, v, 4) === 0;
}

/** The socket's send buffer as the kernel reports it (null when it cannot be read). */
export function sendBufferSize(sock: net.Socket): number | null {
  const c = load(), fd = fdOf(sock);
  if (!c || fd === null) return null;
  const v = Buffer.alloc(4);
  return c.getsockopt(fd, SOL_SOCKET, SO_SNDBUF, v, [4]) === 0 ? v.readInt32LE() : null;
}

/** True when the connection's peer is this machine (127.0.0.0/8, ::1, or IPv4-mapped loopback). */
export function peerIsLoopback(sock: net.Socket): boolean {
  const a = sock.remoteAddress ?? '';
  return a === '::1' || /^(::ffff:)?127\./.test(a);
}
