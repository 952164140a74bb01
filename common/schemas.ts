// Schemas of every workflow input. The client validates with them before it starts anything;
// the workflows validate again on entry, so a script that starts a workflow directly with bad
// input gets a clear, non-retryable failure that names the problem, and nothing moves.
// Pure zod (no Node APIs): safe inside the workflow sandbox.
import { z } from 'zod';

const name = z.string().regex(/^[a-z][a-z0-9-]{0,62}$/i, 'names are letters, digits and dashes, starting with a letter');
/** Hosts to look for the VM on when the source is not given (SourceOfMove). */
const candidates = z.array(name).min(1, 'candidates: at least one host').max(1000);
const sourceGiven = (m: { from?: string; candidates?: string[] }): boolean => m.from !== undefined || m.candidates !== undefined;
const sourceGivenMessage = 'give the source host (from) or the hosts to look for the VM on (candidates)';
const absDir = z.string().min(1).refine((p) => p.startsWith('/'), 'storage paths must be absolute').refine((p) => !p.split('/').includes('..'), 'storage paths may not contain ".."');

export const policyInputSchema = z.object({
  downtimeLimitMs: z.number().int().min(1).max(60_000),
  maxBandwidth: z.number().int().min(0),
  maxRounds: z.number().int().min(1).max(10_000),
  convergenceTimeoutMsPerGiB: z.number().int().min(1000),
  autoConverge: z.boolean(),
  throttleInitial: z.number().min(0).max(0.99),
  throttleIncrement: z.number().min(0.01).max(0.99),
  throttleMax: z.number().min(0).max(0.99),
  verify: z.enum(['digest', 'full', 'sequence']),
  compression: z.enum(['none', 'deflate']),
  streams: z.number().int().min(1, 'streams: at least 1').max(16, 'streams: at most 16'),
  approveCutover: z.boolean(),
  approvalTimeoutMs: z.number().int().min(1000),
}).partial().strict();

export const liveMigrationInputSchema = z.object({
  migrationId: z.string().min(1).max(200),
  vm: name,
  from: name.optional(),
  candidates: candidates.optional(),
  to: name,
  policy: policyInputSchema.optional(),
}).strict().refine(sourceGiven, sourceGivenMessage).refine((m) => m.from !== m.to, 'source and destination are the same host');

export const storageMigrationInputSchema = z.object({
  migrationId: z.string().min(1).max(200),
  vm: name,
  host: name,
  targets: z.record(z.string().regex(/^disk\d+$/, 'disk ids look like disk0'), absDir).refine((t) => Object.keys(t).length > 0, 'no target directories'),
  maxBandwidth: z.number().int().min(0).optional(),
}).strict();

export const sharedNothingInputSchema = z.object({
  migrationId: z.string().min(1).max(200),
  vm: name,
  from: name.optional(),
  candidates: candidates.optional(),
  to: name,
  toPath: absDir.optional(),
  policy: policyInputSchema.optional(),
}).strict().refine(sourceGiven, sourceGivenMessage).refine((m) => m.from !== m.to, 'source and destination are the same host');

export const evacuateInputSchema = z.object({
  host: name,
  to: z.array(name).min(1, 'no destination hosts'),
  concurrency: z.number().int().min(1).max(64).optional(),
  perHostLimit: z.number().int().min(1).max(64).optional(),
  policy: policyInputSchema.optional(),
}).strict().refine((e) => !e.to.includes(e.host), 'cannot evacuate a host onto itself');

/** "field: problem; field: problem" */
export function describeIssues(e: z.ZodError): string {
  return e.issues.map((i) => (i.path.length ? `${i.path.join('.')}: ${i.message}` : i.message)).join('; ');
}
