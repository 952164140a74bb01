// Compensations are registered *before* the step they undo (a step that fails half-way must
// still be undone) and run in reverse order inside a non-cancellable scope, so neither an
// operator's cancel nor a failure can skip them.
import { CancellationScope, log } from '@temporalio/workflow';

export class Saga {
  private steps: Array<{ name: string; undo: () => Promise<unknown> }> = [];

  add(name: string, undo: () => Promise<unknown>): void {
    this.steps.push({ name, undo });
  }

  /** Past the point of no return there is nothing to undo: forward-only from here. */
  clear(): void {
    this.steps = [];
  }

  async compensate(): Promise<string[]> {
    const errors: string[] = [];
    await CancellationScope.nonCancellable(async () => {
      for (const s of this.steps.reverse()) {
        try {
          await s.undo();
        } catch (e) {
          log.error('compensation failed', { step: s.name, error: (e as Error).message });
          errors.push(`${s.name}: ${(e as Error).message}`);
        }
      }
    });
    this.steps = [];
    return errors;
  }
}
