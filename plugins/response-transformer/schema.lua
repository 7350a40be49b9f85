local function operation(description, headers)
  return { type = "record", default = {}, description = description, fields = {
    headers = headers,
  } }
end

return { fields = {
  remove = operation("applied first: response headers removed",
                     { type = "array", elements = { type = "string", min = 1 }, default = {},
                       description = "header names removed" }),
  rename = operation("applied second: response headers renamed",
                     { type = "map", values = { type = "string" }, default = {},
                       description = "old name: new name; the header keeps its value(s) under the new name (only if present)" }),
  replace = operation("applied third: values replaced where present",
                      { type = "map", values = { type = "string" }, default = {},
                        description = "name: value; replaces the header's value(s) only if the header is present" }),
  add = operation("applied fourth: set where absent",
                  { type = "map", values = { type = "string" }, default = {},
                    description = "name: value; sets the header only if it is absent" }),
  append = operation("applied last: one more line each",
                     { type = "map", values = { type = "string" }, default = {},
                       description = "name: value; adds one more line for the header (sets it when absent)" }),
} }
