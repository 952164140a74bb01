// Custom search attributes every migration workflow keeps current, so operators can filter
// in the Temporal UI ("all migrations of vm7", "all rolled back today").
import { defineSearchAttributeKey, SearchAttributeType } from '@temporalio/common';

export const VmName = defineSearchAttributeKey('VmName', SearchAttributeType.KEYWORD);
export const SourceHost = defineSearchAttributeKey('SourceHost', SearchAttributeType.KEYWORD);
export const DestinationHost = defineSearchAttributeKey('DestinationHost', SearchAttributeType.KEYWORD);
export const MigrationType = defineSearchAttributeKey('MigrationType', SearchAttributeType.KEYWORD);
export const MigrationPhase = defineSearchAttributeKey('MigrationPhase', SearchAttributeType.KEYWORD);
export const MigrationOutcome = defineSearchAttributeKey('MigrationOutcome', SearchAttributeType.KEYWORD);

/** Name → Temporal type name, for registering them on a server. */
export const SEARCH_ATTRIBUTES: Record<string, 'Keyword'> = {
  VmName: 'Keyword',
  SourceHost: 'Keyword',
  DestinationHost: 'Keyword',
  MigrationType: 'Keyword',
  MigrationPhase: 'Keyword',
  MigrationOutcome: 'Keyword',
};
