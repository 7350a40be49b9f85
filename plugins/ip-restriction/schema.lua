return {
  -- Neither list would let every client through while looking like a restriction.
  at_least_one_of = { "allow", "deny" },
  fields = {
  allow = { type = "array", elements = { type = "string", format = "cidr" }, required = false,
            description = "CIDRs or addresses (IPv4 or IPv6) allowed; when non-empty, every other client is refused (set allow, deny or both)" },
  deny = { type = "array", elements = { type = "string", format = "cidr" }, required = false,
           description = "CIDRs or addresses refused; deny wins over allow (set allow, deny or both)" },
  status = { type = "integer", min = 400, max = 599, default = 403, description = "status of the refusal" },
  message = { type = "string", default = "Your IP address is not allowed", description = "message in the JSON body of the refusal" },
} }
