"""DIAL's resources: buckets, files, conversations, prompts, applications and their sharing
(issue 14, in progress). See docs/architecture.md."""
