// Entry validation of workflow inputs (schemas in common/schemas.ts).
import { ApplicationFailure } from '@temporalio/workflow';
import type { z } from 'zod';
import { describeIssues } from '../common/schemas.js';

export function validated<S extends z.ZodTypeAny>(schema: S, input: unknown, what: string): z.output<S> {
  const r = schema.safeParse(input);
  if (!r.success) throw ApplicationFailure.create({ message: `bad ${what} input: ${describeIssues(r.error)}`, type: 'BadInput', nonRetryable: true });
  return r.data;
}
