// Control channel of a simulated VM: newline-delimited JSON requests over a Unix socket,
// the way QMP is for QEMU. It outlives the host agent, so a restarted agent re-attaches.
import net from 'node:net';
import fs from 'node:fs';

type Handler = (params: Record<string, unknown>) => Promise<unknown> | unknown;

export function serveControl(socketPath: string, handlers: Record<string, Handler>): net.Server {
  try { fs.unlinkSync(socketPath); } catch { /* absent */ }
  const server = net.createServer((sock) => {
    let buf = '';
    sock.setEncoding('utf8');
    sock.on('error', () => undefined);
    sock.on('data', (chunk: string) => {
      buf += chunk;
      let nl: number;
      while ((nl = buf.indexOf('\n')) >= 0) {
        const line = buf.slice(0, nl);
        buf = buf.slice(nl + 1);
        void (async () => {
          let req: { id?: unknown; method?: string; params?: Record<string, unknown> };
          try { req = JSON.parse(line); } catch { sock.write(JSON.stringify({ error: 'malformed request' }) + '\n'); return; }
          const h = req.method ? handlers[req.method] : undefined;
          try {
            if (!h) throw new Error(`unknown control method ${String(req.method)}`);
            const result = await h(req.params ?? {});
            if (!sock.destroyed) sock.write(JSON.stringify({ id: req.id, result: result ?? null }) + '\n');
          } catch (e) {
            const err = e as Error;
            if (!sock.destroyed) sock.write(JSON.stringify({ id: req.id, error: err.message, errorName: err.name }) + '\n');
          }
        })();
      }
    });
  });
  server.listen(socketPath);
  return server;
}

export class ControlError extends Error {
  constructor(message: string, readonly remoteName?: string) {
    super(message);
    this.name = remoteName ?? 'ControlError';
  }
}

/** One request, one connection: simple, and nothing to re-establish after either side restarts. */
export function callControl<T>(socketPath: string, method: string, params: Record<string, unknown> = {}, timeoutMs = 60_000): Promise<T> {
  return new Promise<T>((resolve, reject) => {
    const sock = net.connect(socketPath);
    let buf = '';
    const timer = setTimeout(() => { sock.destroy(); reject(new ControlError(`VM control call ${method} timed out after ${timeoutMs} ms`)); }, timeoutMs);
    sock.setEncoding('utf8');
    sock.on('connect', () => sock.write(JSON.stringify({ id: 1, method, params }) + '\n'));
    sock.on('data', (c: string) => {
      buf += c;
      const nl = buf.indexOf('\n');
      if (nl < 0) return;
      clearTimeout(timer);
      sock.end();
      const res = JSON.parse(buf.slice(0, nl)) as { result?: T; error?: string; errorName?: string };
      if (res.error !== undefined) reject(new ControlError(res.error, res.errorName));
      else resolve(res.result as T);
    });
    sock.on('error', (e) => { clearTimeout(timer); reject(new ControlError(`VM control socket ${socketPath}: ${e.message}`, 'VmUnreachable')); });
    sock.on('close', () => { clearTimeout(timer); if (!buf.includes('\n')) reject(new ControlError(`VM control socket closed during ${method}`, 'VmUnreachable')); });
  });
}
