// Names shared by workflows and workers. No Node imports here: workflows import this file.
export const hostTaskQueue = (host: string): string => `host-${host}`;
export const ORCHESTRATOR_TASK_QUEUE = 'vmferry-orchestrator';
/** Workflow ids are migration ids: `<type>-<vm>-<suffix>`. */
export const migrationIdFor = (type: string, vm: string, suffix: string): string => `${type}-${vm}-${suffix}`;
