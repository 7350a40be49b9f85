return { fields = {
  allow = { type = "array", elements = { type = "string", format = "cidr" }, default = {},
            description = "CIDRs or addresses (IPv4 or IPv6) allowed; when non-empty, every other client is refused" },
  deny = { type = "array", elements = { type = "string", format = "cidr" }, default = {},
           description = "CIDRs or addresses refused; deny wins over allow" },
  status = { type = "integer", min = 400, max = 599, default = 403, description = "status of the refusal" },
  message = { type = "string", default = "Your IP address is not allowed", description = "message in the JSON body of the refusal" },
} }
