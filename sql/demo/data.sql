-- Deterministic demo rows: three shops, ~40 products, 8 pages and ~40 FAQ pairs each.
-- Ids are md5-derived UUIDs, so re-running inserts nothing new (ON CONFLICT DO NOTHING).

INSERT INTO accounts_user (id, username, company, domain) VALUES
    (1, 'alpine', 'Alpine Outfitters', 'alpine-outfitters.example'),
    (2, 'crumb', 'Crumb & Co Bakery', 'crumbandco.example'),
    (3, 'spoke', 'Spoke Street Cycles', 'spokestreet.example')
ON CONFLICT (id) DO NOTHING;

WITH catalogue (user_id, category, item, detail, base_price) AS (VALUES
    (1, 'Shelter', 'two-person tent', 'a freestanding dome with two doors and a full-coverage rain fly', 289),
    (1, 'Sleep', 'down sleeping bag', 'rated to minus five degrees with 650-fill responsibly sourced down', 249),
    (1, 'Packs', 'hiking backpack', 'a 45 litre frame pack with an adjustable torso and hip-belt pockets', 179),
    (1, 'Footwear', 'hiking boots', 'waterproof leather boots with a Vibram sole and ankle support', 199),
    (1, 'Clothing', 'rain jacket', 'a three-layer waterproof breathable shell with pit zips', 229),
    (1, 'Lighting', 'headlamp', 'a rechargeable 400 lumen headlamp with a red night mode', 49),
    (1, 'Water', 'water filter', 'a hollow-fibre squeeze filter that removes bacteria and protozoa', 39),
    (1, 'Cooking', 'camping stove', 'a compact canister stove that boils a litre in three minutes', 69),
    (1, 'Accessories', 'trekking poles', 'carbon poles that fold to 38 centimetres with cork grips', 119),
    (1, 'Clothing', 'fleece jacket', 'a warm midlayer made from recycled polyester fleece', 89),
    (2, 'Bread', 'sourdough loaf', 'naturally leavened for 36 hours with a crisp, blistered crust', 6),
    (2, 'Pastry', 'butter croissant', 'laminated by hand with French butter, baked every morning', 3),
    (2, 'Bread', 'baguette', 'a traditional French stick with an open crumb', 3),
    (2, 'Bread', 'dark rye bread', 'dense Nordic-style rye with sunflower and flax seeds', 7),
    (2, 'Pastry', 'cinnamon roll', 'soft brioche dough rolled with cinnamon sugar and cardamom', 4),
    (2, 'Cakes', 'birthday cake', 'a layered sponge with a choice of chocolate, vanilla or lemon frosting', 39),
    (2, 'Sweets', 'chocolate brownie', 'fudgy brownies made with 70 percent dark chocolate', 3),
    (2, 'Bread', 'rosemary focaccia', 'olive oil focaccia topped with rosemary and sea salt', 5),
    (2, 'Bread', 'sesame bagel', 'boiled then baked New York style bagels', 2),
    (2, 'Sweets', 'blueberry muffin', 'moist muffins packed with wild blueberries', 3),
    (3, 'Bikes', 'road bike', 'an aluminium endurance frame with a carbon fork and 22 gears', 1199),
    (3, 'Bikes', 'mountain bike', 'a hardtail trail bike with 120 mm suspension and hydraulic disc brakes', 1499),
    (3, 'Bikes', 'city bike', 'an upright commuter with mudguards, rack and dynamo lights', 699),
    (3, 'Safety', 'bike helmet', 'a MIPS helmet with a magnetic buckle and rear light', 89),
    (3, 'Security', 'U-lock', 'a hardened steel U-lock rated Sold Secure Gold', 69),
    (3, 'Components', 'tubeless tyre', 'a puncture-resistant 700x32 tubeless-ready tyre', 49),
    (3, 'Accessories', 'bike pump', 'a floor pump with a pressure gauge and a dual-valve head', 39),
    (3, 'Lighting', 'front light', 'a USB-rechargeable 800 lumen light for dark commutes', 59),
    (3, 'Clothing', 'cycling jersey', 'a breathable jersey with three rear pockets', 65),
    (3, 'Service', 'full service', 'a complete strip-down, clean, adjustment and safety check of your bike', 120)
), variants (variant, label, factor) AS (VALUES
    (1, 'Classic', 1.0), (2, 'Pro', 1.35), (3, 'Eco', 1.1), (4, 'Compact', 0.9)
)
INSERT INTO web_knowledge_product (id, user_id, name, description, price, category, in_stock)
SELECT md5('product-' || c.user_id || '-' || c.item || '-' || v.variant)::uuid,
       c.user_id,
       v.label || ' ' || c.item,
       'The ' || v.label || ' ' || c.item || ' is ' || c.detail || '. '
         || CASE v.variant
              WHEN 1 THEN 'Our best-selling version, chosen by most customers.'
              WHEN 2 THEN 'Upgraded materials for heavy, everyday use.'
              WHEN 3 THEN 'Made with recycled and low-impact materials.'
              ELSE 'A smaller, lighter version that is easy to carry and store.'
            END,
       round(c.base_price * v.factor, 2),
       c.category,
       (v.variant <> 4 OR c.user_id <> 2)
  FROM catalogue c CROSS JOIN variants v
ON CONFLICT (id) DO NOTHING;

WITH topics (topic, slug, status, body) AS (VALUES
    ('Shipping and delivery', 'shipping', 'completed',
     '{company} ships orders within two business days from our warehouse. Standard delivery takes three to five business days and is free for orders over 50 euros. Express delivery arrives the next business day when you order before 2 pm. You receive a tracking link by email as soon as your parcel leaves us. We deliver to all EU countries, Switzerland, Norway and the United Kingdom.'),
    ('Returns and refunds', 'returns', 'completed',
     'You can return any unused item to {company} within 30 days of delivery. Start a return from your account page or by emailing returns@{domain}; we send you a prepaid label. Refunds go back to the original payment method within five business days of the return reaching us. Custom and personalised orders cannot be returned unless they are faulty.'),
    ('Warranty', 'warranty', 'completed',
     'Everything {company} sells carries a two-year warranty against manufacturing defects. If something breaks in normal use, send us a photo and your order number and we repair or replace it free of charge. The warranty does not cover wear and tear, accidents or modifications.'),
    ('Opening hours and location', 'visit-us', 'completed',
     'Our shop is open Monday to Friday from 9 am to 6 pm and on Saturdays from 10 am to 4 pm. We are closed on Sundays and public holidays. You will find {company} at 12 Market Street, next to the central station; there is a public car park behind the shop.'),
    ('Payment options', 'payment', 'completed',
     '{company} accepts Visa, Mastercard, American Express, PayPal, Apple Pay and bank transfer. You can also pay in three interest-free instalments for orders over 100 euros. Prices include VAT. Business customers can ask for an invoice with their VAT number.'),
    ('Contact and customer service', 'contact', 'completed',
     'Our customer service team answers emails to hello@{domain} within one business day. You can call us on weekdays between 9 am and 5 pm. For questions about an existing order, please have your order number ready.'),
    ('About us', 'about', 'pending',
     '{company} was founded by people who love what they sell. We are a small, independent team.'),
    ('Gift cards', 'gift-cards', 'failed', '')
), pages AS (
    SELECT md5('page-' || u.id || '-' || t.slug)::uuid AS id, u.id AS user_id,
           'https://' || u.domain || '/' || t.slug AS url,
           t.topic || ' | ' || u.company AS title,
           replace(replace(t.body, '{company}', u.company), '{domain}', u.domain) AS content,
           t.status AS crawl_status
      FROM accounts_user u CROSS JOIN topics t
     WHERE u.id IN (1, 2, 3)
)
INSERT INTO web_knowledge_websitepage (id, user_id, url, title, content, crawl_status)
SELECT id, user_id, url, title, content, crawl_status FROM pages
ON CONFLICT (id) DO NOTHING;

WITH faqs (slug, n, question, answer, status) AS (VALUES
    ('shipping', 1, 'How long does delivery take?', 'Standard delivery takes three to five business days after your order ships; orders ship within two business days.', 'completed'),
    ('shipping', 2, 'Is shipping free?', 'Yes, standard shipping is free for orders over 50 euros. Below that it costs 4.90 euros.', 'completed'),
    ('shipping', 3, 'Do you offer express or next-day delivery?', 'Yes. Order before 2 pm on a business day and choose express at checkout to receive your parcel the next business day.', 'completed'),
    ('shipping', 4, 'Which countries do you deliver to?', 'We deliver to every EU country, Switzerland, Norway and the United Kingdom.', 'completed'),
    ('shipping', 5, 'How can I track my order?', 'We email you a tracking link as soon as your parcel leaves our warehouse.', 'completed'),
    ('returns', 1, 'Can I return an item?', 'Yes, you can return any unused item within 30 days of delivery.', 'completed'),
    ('returns', 2, 'How do I start a return?', 'Start it from your account page or email returns@{domain}; we send you a prepaid return label.', 'completed'),
    ('returns', 3, 'When will I get my refund?', 'Refunds are paid to your original payment method within five business days after the return reaches us.', 'completed'),
    ('returns', 4, 'Can I return a personalised order?', 'Custom and personalised orders can only be returned if they are faulty.', 'completed'),
    ('returns', 5, 'Do I have to pay for return shipping?', 'No, returns within the EU use our prepaid label at no cost to you.', 'generating'),
    ('warranty', 1, 'Is there a warranty on your products?', 'Every product has a two-year warranty against manufacturing defects.', 'completed'),
    ('warranty', 2, 'My item broke. What should I do?', 'Send us a photo and your order number; if it is a defect we repair or replace it for free.', 'completed'),
    ('warranty', 3, 'Does the warranty cover accidental damage?', 'No, the warranty does not cover accidents, wear and tear or modifications.', 'completed'),
    ('visit-us', 1, 'What are your opening hours?', 'We are open Monday to Friday 9 am to 6 pm and Saturday 10 am to 4 pm, closed on Sundays and public holidays.', 'completed'),
    ('visit-us', 2, 'Where is your shop?', 'Our shop is at 12 Market Street, next to the central station.', 'completed'),
    ('visit-us', 3, 'Is there parking near the shop?', 'Yes, there is a public car park right behind the shop.', 'completed'),
    ('visit-us', 4, 'Are you open on Sundays?', 'No, we are closed on Sundays and public holidays.', 'completed'),
    ('payment', 1, 'Which payment methods do you accept?', 'We accept Visa, Mastercard, American Express, PayPal, Apple Pay and bank transfer.', 'completed'),
    ('payment', 2, 'Can I pay in instalments?', 'Yes, orders over 100 euros can be paid in three interest-free instalments.', 'completed'),
    ('payment', 3, 'Do prices include VAT?', 'Yes, all prices include VAT. Business customers can request an invoice showing their VAT number.', 'completed'),
    ('contact', 1, 'How can I contact customer service?', 'Email hello@{domain} and we reply within one business day, or call us on weekdays from 9 am to 5 pm.', 'completed'),
    ('contact', 2, 'What do I need when I call about an order?', 'Please have your order number ready so we can find your order quickly.', 'completed'),
    ('about', 1, 'Who founded the company?', 'A small team of enthusiasts founded {company}.', 'pending')
)
INSERT INTO web_knowledge_qapair (id, page_id, question, answer, generation_status)
SELECT md5('qa-' || u.id || '-' || f.slug || '-' || f.n)::uuid,
       md5('page-' || u.id || '-' || f.slug)::uuid,
       f.question,
       replace(replace(f.answer, '{company}', u.company), '{domain}', u.domain),
       f.status
  FROM accounts_user u CROSS JOIN faqs f
 WHERE u.id IN (1, 2, 3)
ON CONFLICT (id) DO NOTHING;

INSERT INTO ai_model_aiprompts (user_id, manual_prompt)
SELECT u.id,
       'You are the friendly assistant of ' || u.company || '. Answer in the customer''s language, '
       || 'keep answers short, and always mention free shipping over 50 euros when shipping comes up. '
       || 'Never promise delivery dates for custom orders; ask the customer to email hello@' || u.domain || ' instead.'
  FROM accounts_user u
 WHERE u.id IN (1, 2, 3)
ON CONFLICT (user_id) DO NOTHING;
