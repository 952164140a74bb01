// Activities of the orchestrator worker itself, run as local activities (no host involved).
import { mintGrantToken } from '../dataplane/endpoint.js';

export const orchestratorActivities = {
  /**
   * A one-time data-plane grant token for `destination`, handed to both ends at once so the
   * source connects while the destination prepares (it registers the token, only its hash kept).
   * A local activity: randomness has no place in workflow code, and its marker records the token
   * exactly as an activity result would (see docs/SECURITY.md: tokens are in the history).
   */
  async mintGrant(p: { destination: string }): Promise<{ token: string }> {
    return { token: mintGrantToken(p.destination) };
  },
};

export type OrchestratorActivities = typeof orchestratorActivities;
