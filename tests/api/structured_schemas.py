"""Twenty JSON Schemas for the structured-output tests, written after the public examples of
json-schema.org ("Getting started" product, the address / calendar / card / geographical-location /
blog-post / device / e-commerce / health-record / job-posting / movie / user-profile examples) and
OpenAI's structured-outputs guide (math steps, UI component, moderation, research paper extraction).

Every string has a maxLength and every array a maxItems, so outputs finish within the tests'
max_tokens; the shapes are the examples', not what the model happens to write.
"""

S = {"type": "string", "maxLength": 24}


def obj(props: dict, required=None, **extra) -> dict:
    return {"type": "object", "properties": props, "required": list(props) if required is None else required,
            "additionalProperties": False, **extra}


SCHEMAS = {
    # json-schema.org getting started: product with bounded price, tags array, nested dimensions
    "product": obj({"productId": {"type": "integer", "minimum": 1, "maximum": 99999},
                    "productName": S,
                    "price": {"type": "number", "exclusiveMinimum": 0, "maximum": 1000},
                    "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "minItems": 1,
                             "maxItems": 3},
                    "dimensions": obj({"length": {"type": "number", "minimum": 0, "maximum": 100},
                                       "width": {"type": "number", "minimum": 0, "maximum": 100},
                                       "height": {"type": "number", "minimum": 0, "maximum": 100}})},
                   required=["productId", "productName", "price"]),
    # address: optional fields, a postal-code pattern
    "address": obj({"street_address": S, "locality": S, "region": S,
                    "postal_code": {"type": "string", "pattern": "^[0-9]{5}$"},
                    "country_name": {"type": "string", "enum": ["France", "Germany", "Japan", "Kenya"]}},
                   required=["locality", "region", "country_name"]),
    # calendar event: date pattern, optional location
    "calendar": obj({"summary": S, "location": S,
                     "dtstart": {"type": "string", "pattern": "^20[0-9]{2}-[01][0-9]-[0-3][0-9]$"},
                     "duration_minutes": {"type": "integer", "minimum": 5, "maximum": 480}},
                    required=["summary", "dtstart"]),
    # geographical location: bounded latitude / longitude
    "geo": obj({"latitude": {"type": "number", "minimum": -90, "maximum": 90},
                "longitude": {"type": "number", "minimum": -180, "maximum": 180}}),
    # card (vCard-like): nested objects and an array of objects
    "card": obj({"fn": S, "email": {"type": "string", "pattern": "^[a-z]{1,10}@[a-z]{1,10}\\.(com|org)$"},
                 "tel": {"type": "array", "maxItems": 2,
                         "items": obj({"type": {"type": "string", "enum": ["home", "work", "cell"]},
                                       "value": {"type": "string", "pattern": "^[0-9]{3}-[0-9]{4}$"}})},
                 "org": obj({"organizationName": S, "organizationUnit": S}, required=["organizationName"])},
                required=["fn"]),
    # blog post: enum status, array of short tags
    "blog_post": obj({"title": S, "author": S, "status": {"type": "string", "enum": ["draft", "published"]},
                      "tags": {"type": "array", "items": {"type": "string", "maxLength": 10}, "maxItems": 3}},
                     required=["title", "status"]),
    # device: anyOf between a phone and a laptop
    "device": obj({"deviceType": {"type": "string", "enum": ["phone", "laptop"]},
                   "spec": {"anyOf": [obj({"screenInches": {"type": "number", "minimum": 3, "maximum": 8}}),
                                      obj({"ramGb": {"type": "integer", "minimum": 4, "maximum": 64},
                                           "keyboard": {"type": "boolean"}})]}}),
    # e-commerce order: array of line items with min/max items
    "order": obj({"orderId": {"type": "string", "pattern": "^ORD-[0-9]{4}$"},
                  "items": {"type": "array", "minItems": 1, "maxItems": 3,
                            "items": obj({"sku": {"type": "string", "maxLength": 8},
                                          "quantity": {"type": "integer", "minimum": 1, "maximum": 9}})},
                  "paid": {"type": "boolean"}}),
    # health record: nullable field via anyOf, bounded integers
    "health": obj({"patientName": S, "age": {"type": "integer", "minimum": 0, "maximum": 130},
                   "bloodType": {"type": "string", "enum": ["A+", "A-", "B+", "B-", "AB+", "AB-", "O+", "O-"]},
                   "allergies": {"anyOf": [{"type": "array", "items": {"type": "string", "maxLength": 12},
                                            "maxItems": 3}, {"type": "null"}]}}),
    # job posting: salary range object, enum employment type
    "job": obj({"title": S, "employmentType": {"type": "string", "enum": ["full-time", "part-time", "contract"]},
                "salary": obj({"min": {"type": "integer", "minimum": 0, "maximum": 500000},
                               "max": {"type": "integer", "minimum": 0, "maximum": 500000}}),
                "remote": {"type": "boolean"}}, required=["title", "employmentType"]),
    # movie: year bounds, genre enum array
    "movie": obj({"title": S, "year": {"type": "integer", "minimum": 1888, "maximum": 2030},
                  "genres": {"type": "array", "minItems": 1, "maxItems": 2,
                             "items": {"type": "string", "enum": ["drama", "comedy", "action", "horror"]}},
                  "rating": {"type": "number", "minimum": 0, "maximum": 10}}),
    # user profile: username pattern, optional age
    "user_profile": obj({"username": {"type": "string", "pattern": "^[a-z][a-z0-9_]{2,11}$"},
                         "age": {"type": "integer", "minimum": 13, "maximum": 120},
                         "interests": {"type": "array", "items": {"type": "string", "maxLength": 12},
                                       "maxItems": 2}}, required=["username"]),
    # OpenAI guide: chain-of-thought math steps (array of objects)
    "math_steps": obj({"steps": {"type": "array", "minItems": 1, "maxItems": 2,
                                 "items": obj({"explanation": S, "output": {"type": "string", "maxLength": 12}})},
                       "final_answer": {"type": "string", "maxLength": 12}}),
    # OpenAI guide: moderation with enum category and bounded confidence
    "moderation": obj({"is_violating": {"type": "boolean"},
                       "category": {"anyOf": [{"type": "string", "enum": ["violence", "sexual", "self_harm"]},
                                              {"type": "null"}]},
                       "confidence": {"type": "number", "minimum": 0, "maximum": 1}}),
    # OpenAI guide: research paper extraction
    "paper": obj({"title": S, "authors": {"type": "array", "items": {"type": "string", "maxLength": 16},
                                          "minItems": 1, "maxItems": 2},
                  "abstract": {"type": "string", "maxLength": 40}, "keywords": {"type": "array", "maxItems": 2,
                                                                              "items": {"type": "string",
                                                                                        "maxLength": 10}}}),
    # OpenAI guide: UI component (recursion bounded to two levels)
    "ui": obj({"type": {"type": "string", "enum": ["div", "button", "header", "section"]},
               "label": {"type": "string", "maxLength": 16},
               "children": {"type": "array", "maxItems": 2,
                            "items": obj({"type": {"type": "string", "enum": ["button", "field"]},
                                          "label": {"type": "string", "maxLength": 16}})}}),
    # enum-only and const-like fields
    "traffic_light": obj({"color": {"type": "string", "enum": ["red", "amber", "green"]},
                          "blinking": {"type": "boolean"}}),
    # bounded number list
    "measurements": obj({"unit": {"type": "string", "enum": ["cm", "in"]},
                         "values": {"type": "array", "items": {"type": "number", "minimum": -50, "maximum": 50},
                                    "minItems": 2, "maxItems": 4}}),
    # recipe: nested array of ingredient objects, optional note
    "recipe": obj({"name": S, "servings": {"type": "integer", "minimum": 1, "maximum": 12},
                   "ingredients": {"type": "array", "minItems": 1, "maxItems": 3,
                                   "items": obj({"item": {"type": "string", "maxLength": 12},
                                                 "grams": {"type": "integer", "minimum": 1, "maximum": 1000}})},
                   "note": S}, required=["name", "servings", "ingredients"]),
    # anyOf at the top level: a point or a circle
    "shape": {"anyOf": [obj({"kind": {"type": "string", "enum": ["point"]},
                             "x": {"type": "integer", "minimum": -9, "maximum": 9}}),
                        obj({"kind": {"type": "string", "enum": ["circle"]},
                             "radius": {"type": "number", "exclusiveMinimum": 0, "maximum": 5}})]},
}
assert len(SCHEMAS) == 20
