// The lab's data-plane PKI: one CA, one certificate per host (CN and SAN = the host name,
// usable as TLS server and client), made with the openssl CLI. Files under <lab>/pki/; keys are
// mode 0600. Idempotent: what exists is kept, so restarting the lab keeps every identity.
import fs from 'node:fs';
import path from 'node:path';
import { execFileSync } from 'node:child_process';

export interface HostTls { ca: string; cert: string; key: string }

const CURVE = ['-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes'];

function openssl(args: string[], cwd: string): void {
  try {
    execFileSync('openssl', args, { cwd, stdio: ['ignore', 'pipe', 'pipe'] });
  } catch (e) {
    const err = e as { stderr?: Buffer; message: string };
    throw new Error(`openssl ${args[0]} failed: ${err.stderr?.toString().trim() || err.message}`);
  }
}

export function pkiDir(labDir: string): string {
  return path.join(labDir, 'pki');
}

/** The CA (certificate and key) of a PKI directory, created if missing. */
export function ensureCa(dir: string, subject = 'vmferry lab data-plane CA'): { cert: string; key: string } {
  fs.mkdirSync(dir, { recursive: true, mode: 0o700 });
  const cert = path.join(dir, 'ca.pem');
  const key = path.join(dir, 'ca.key');
  if (!fs.existsSync(cert) || !fs.existsSync(key)) {
    openssl(['req', '-x509', ...CURVE, '-keyout', key, '-out', cert, '-days', '3650', '-subj', `/CN=${subject}`,
      '-addext', 'basicConstraints=critical,CA:TRUE,pathlen:0', '-addext', 'keyUsage=critical,keyCertSign,cRLSign'], dir);
    fs.chmodSync(key, 0o600);
  }
  return { cert, key };
}

/** A host certificate signed by the CA of `dir` (CN and SAN DNS = `name`), created if missing. */
export function ensureHostCert(dir: string, name: string): HostTls {
  if (!/^[A-Za-z][A-Za-z0-9-]{0,63}$/.test(name)) throw new Error(`bad host name for a certificate: ${name}`);
  const ca = ensureCa(dir);
  const cert = path.join(dir, `${name}.pem`);
  const key = path.join(dir, `${name}.key`);
  if (!fs.existsSync(cert) || !fs.existsSync(key)) {
    const csr = path.join(dir, `${name}.csr`);
    const ext = path.join(dir, `${name}.ext`);
    openssl(['req', ...CURVE, '-keyout', key, '-out', csr, '-subj', `/CN=${name}`], dir);
    fs.chmodSync(key, 0o600);
    fs.writeFileSync(ext, [
      'basicConstraints=critical,CA:FALSE',
      'keyUsage=critical,digitalSignature',
      'extendedKeyUsage=serverAuth,clientAuth',
      `subjectAltName=DNS:${name}`,
    ].join('\n') + '\n');
    openssl(['x509', '-req', '-in', csr, '-CA', ca.cert, '-CAkey', ca.key, '-CAcreateserial', '-out', cert, '-days', '825', '-extfile', ext], dir);
    fs.rmSync(csr, { force: true });
    fs.rmSync(ext, { force: true });
  }
  return { ca: ca.cert, cert, key };
}

/** Lab PKI: CA + a certificate for each host; returns each host's `tls` for its host.json. */
export function ensureLabPki(labDir: string, hosts: string[]): Record<string, HostTls> {
  const dir = pkiDir(labDir);
  const out: Record<string, HostTls> = {};
  for (const h of hosts) out[h] = ensureHostCert(dir, h);
  return out;
}
