return {
  exactly_one_of = { "allow", "deny" },
  fields = {
  allow = { type = "array", elements = { type = "string", min = 1 }, required = false,
            description = "consumer groups let through; any other consumer gets 403 (set exactly one of allow and deny)" },
  deny = { type = "array", elements = { type = "string", min = 1 }, required = false,
           description = "consumer groups refused with 403; any other consumer is let through (set exactly one of allow and deny)" },
  hide_groups_header = { type = "boolean", default = false,
                         description = "do not send the X-Consumer-Groups header (the consumer's groups) upstream" },
} }
