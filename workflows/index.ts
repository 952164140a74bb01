// Every workflow the orchestrator worker serves. Import only workflow-safe modules here.
export { liveMigration } from './live-migration.js';
export { progressQuery } from './tracker.js';
export { hostRequest, inventory } from './admin.js';
export { storageMigration } from './storage-migration.js';
export { sharedNothingMigration } from './shared-nothing.js';
export { evacuateHost, evacuationQuery } from './evacuate.js';
export { approveCutoverUpdate } from './tracker.js';
